//! The ceiling of the push path on this machine: a bare quinn server that pushes small messages
//! to many connections with no logic at all — no requests, no routing, no distance, no queues —
//! so that nearby's CPU per delivered push can be read as a share of what the transport alone
//! costs.
//!
//! The server ([`serve`]) runs as its own process (`nearby-loadsim ceiling` starts
//! `nearby-loadsim ceiling-server`), so its CPU is read from `/proc` apart from the clients'. It
//! uses nearby's own TLS and transport settings ([`nearby_node::service::tls`]) and the SDK's
//! client settings, so the only difference from nearby is everything above quinn.
//!
//! The driver ([`drive`]) opens the sessions over a few shared UDP endpoints (like the load
//! simulator), then runs the load steps: for each it tells the server `step <rate> <ms>` on the
//! server's stdin, the server pushes `rate` messages a second round-robin over the sessions for
//! that long and answers `done <sent> <failed>` on stdout. Every message carries its step, a
//! sequence number and the wall-clock time it was written, so the driver measures
//! write-to-receive latency per step (client and server share this machine's clock).
//!
//! Two ways to push are measured: one unidirectional stream per session, as nearby does (each
//! message is written to the stream and usually leaves in a packet of its own), and one QUIC
//! datagram per message (unreliable, unordered: what nearby would use only if losing or
//! reordering an event were acceptable — see `docs/protocol.md` on why events are on a stream).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::compare::P99_BOUND_MS;
use crate::metrics::{LatencySummary, ProcUsage};
use crate::oracle::latency_histogram;
use crate::procstat::{self, ProcSample};

/// Bytes per pushed message: about the size of a `FriendMoved` event frame.
pub const PAYLOAD: usize = 48;
/// UDP endpoints the driver's sessions share.
const SHARED_ENDPOINTS: usize = 4;
/// Handshakes in flight at once while connecting.
const CONNECT_CONCURRENCY: usize = 64;
/// A step's share of messages that may go missing (datagrams) and still count as "within bounds".
pub const LOSS_BOUND: f64 = 0.001;

/// How the server pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One unidirectional stream per session (what nearby does).
    Stream,
    /// One QUIC datagram per message.
    Datagram,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stream" => Ok(Mode::Stream),
            "datagram" => Ok(Mode::Datagram),
            other => Err(format!("unknown mode {other:?} (stream or datagram)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Stream => "stream",
            Mode::Datagram => "datagram",
        })
    }
}

/// Why the ceiling run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CeilingError {
    /// The server could not be set up.
    #[error("server setup: {0}")]
    Setup(String),
    /// Reading or writing the server process's pipes or files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The server process said something unexpected (or nothing).
    #[error("the server process: {0}")]
    Protocol(String),
    /// Sessions could not connect.
    #[error("connecting: {0}")]
    Connect(String),
    /// The server process could not be read in /proc.
    #[error(transparent)]
    Proc(#[from] procstat::ProcError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> CeilingError {
    move |source| CeilingError::Io { what, source }
}

/// One message: step, sequence number, write time (ns since the Unix epoch), padding.
fn message(step: u32, seq: u64) -> [u8; PAYLOAD] {
    let mut m = [0u8; PAYLOAD];
    m[..4].copy_from_slice(&step.to_le_bytes());
    m[4..12].copy_from_slice(&seq.to_le_bytes());
    m[12..20].copy_from_slice(&unix_nanos().to_le_bytes());
    m
}

/// The step and write time of a message, or `None` if it is not one.
fn parse_message(m: &[u8]) -> Option<(u32, u64)> {
    if m.len() != PAYLOAD {
        return None;
    }
    let step = u32::from_le_bytes(m[..4].try_into().ok()?);
    let at = u64::from_le_bytes(m[12..20].try_into().ok()?);
    Some((step, at))
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the server process is told.
pub struct ServerOptions {
    /// Sessions to wait for before reporting `connected`.
    pub sessions: usize,
    /// How to push.
    pub mode: Mode,
    /// Where to write the self-signed certificate the clients trust.
    pub ca_out: PathBuf,
}

/// Runs the bare push server: accepts `sessions` connections, then runs the steps it reads from
/// `input` (`step <rate> <ms>`, `quit`), writing `ready <addr>`, `connected` and `done <sent>
/// <failed>` lines to `out`.
pub async fn serve(
    opts: ServerOptions,
    input: impl BufRead + Send + 'static,
    mut out: impl Write,
) -> Result<(), CeilingError> {
    let tls = nearby_node::service::tls::ServerTls::self_signed().map_err(CeilingError::Setup)?;
    std::fs::write(&opts.ca_out, &tls.chain_pem).map_err(io("writing the certificate"))?;
    let config = tls.bare_quinn_config().map_err(CeilingError::Setup)?;
    let bind: std::net::SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
    let endpoint = nearby_node::service::server_endpoint(config, bind).map_err(io("binding the server"))?;
    let addr = endpoint.local_addr().map_err(io("reading the server address"))?;
    writeln!(out, "ready {addr}").map_err(io("writing to stdout"))?;
    out.flush().map_err(io("writing to stdout"))?;

    let mut handshakes = JoinSet::new();
    let mut conns = Vec::with_capacity(opts.sessions);
    while conns.len() < opts.sessions {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else {
                    return Err(CeilingError::Setup("the endpoint closed".into()));
                };
                handshakes.spawn(async move { incoming.await });
            }
            Some(done) = handshakes.join_next() => {
                match done {
                    Ok(Ok(conn)) => conns.push(conn),
                    Ok(Err(e)) => tracing::warn!(error = %e, "a handshake failed"),
                    Err(e) => tracing::warn!(error = %e, "a handshake task failed"),
                }
            }
        }
    }
    let mut streams = Vec::new();
    if opts.mode == Mode::Stream {
        for c in &conns {
            streams.push(
                c.open_uni()
                    .await
                    .map_err(|e| CeilingError::Setup(format!("open_uni: {e}")))?,
            );
        }
    }
    writeln!(out, "connected").map_err(io("writing to stdout"))?;
    out.flush().map_err(io("writing to stdout"))?;

    // Commands arrive on a blocking reader; a thread forwards them.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in input.lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut step = 0u32;
    while let Some(line) = rx.recv().await {
        let line = line.map_err(io("reading commands"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["quit"] => break,
            ["step", rate, ms] => {
                let rate: f64 = rate
                    .parse()
                    .map_err(|_| CeilingError::Protocol(format!("bad rate in {line:?}")))?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| CeilingError::Protocol(format!("bad duration in {line:?}")))?;
                step += 1;
                let (sent, failed) = push_step(
                    &conns,
                    &mut streams,
                    opts.mode,
                    step,
                    rate,
                    Duration::from_millis(ms),
                )
                .await;
                writeln!(out, "done {sent} {failed}").map_err(io("writing to stdout"))?;
                out.flush().map_err(io("writing to stdout"))?;
            }
            _ => return Err(CeilingError::Protocol(format!("unknown command {line:?}"))),
        }
    }
    for c in &conns {
        c.close(quinn::VarInt::from_u32(0), b"done");
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// Pushes `rate` messages a second, evenly paced, round-robin over the sessions, for `duration`.
/// Returns (sent, failed).
async fn push_step(
    conns: &[quinn::Connection],
    streams: &mut [quinn::SendStream],
    mode: Mode,
    step: u32,
    rate: f64,
    duration: Duration,
) -> (u64, u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let (mut sent, mut failed, mut next) = (0u64, 0u64, 0usize);
    let n = conns.len().max(1);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(duration);
        let owed = (rate * elapsed.as_secs_f64()) as u64;
        while sent + failed < owed {
            let m = message(step, sent + failed);
            let ok = match mode {
                Mode::Stream => streams[next].write_all(&m).await.is_ok(),
                Mode::Datagram => conns[next]
                    .send_datagram(bytes::Bytes::copy_from_slice(&m))
                    .is_ok(),
            };
            if ok {
                sent += 1;
            } else {
                failed += 1;
            }
            next = (next + 1) % n;
        }
        if elapsed >= duration {
            return (sent, failed);
        }
    }
}

/// A bare push server running as a child process.
pub struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: std::io::BufReader<ChildStdout>,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// The certificate to trust.
    pub ca_pem: String,
}

impl ServerProcess {
    /// Moves the server process, every thread of it, into the cgroup at `dir` (v1 or v2: both
    /// take a pid written to `cgroup.procs`).
    pub fn join_cgroup(&self, dir: &std::path::Path) -> Result<(), CeilingError> {
        std::fs::write(dir.join("cgroup.procs"), self.child.id().to_string())
            .map_err(io("moving the server process into its cgroup"))
    }

    /// Starts `exe ceiling-server` for `sessions` sessions and waits until it listens; with
    /// `cpus`, under `taskset -c <cpus>` (which execs the server, so the pid is the server's).
    pub fn start(
        exe: &std::path::Path,
        sessions: usize,
        mode: Mode,
        dir: &std::path::Path,
        cpus: Option<&str>,
    ) -> Result<Self, CeilingError> {
        let ca = dir.join("ceiling-ca.pem");
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg("ceiling-server")
            .arg("--sessions")
            .arg(sessions.to_string())
            .arg("--mode")
            .arg(mode.to_string())
            .arg("--ca-out")
            .arg(&ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io("starting the server process"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(CeilingError::Protocol("no pipes to the server process".into()));
        };
        let mut p = ServerProcess {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ca_pem: String::new(),
        };
        let line = p.read_line()?;
        p.addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| CeilingError::Protocol(format!("expected `ready <addr>`, got {line:?}")))?;
        p.ca_pem = std::fs::read_to_string(&ca).map_err(io("reading the server's certificate"))?;
        Ok(p)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn read_line(&mut self) -> Result<String, CeilingError> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(io("reading the server's output"))?;
        if n == 0 {
            return Err(CeilingError::Protocol("the server process exited".into()));
        }
        Ok(line.trim().to_string())
    }

    fn send(&mut self, line: &str) -> Result<(), CeilingError> {
        writeln!(self.stdin, "{line}").map_err(io("writing to the server"))?;
        self.stdin.flush().map_err(io("writing to the server"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.send("quit");
        // Give it a moment to close its connections, then make sure it is gone.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct CeilingConfig {
    /// Sessions (connections) to push to.
    pub sessions: usize,
    /// Pushes per second, one step each.
    pub rates: Vec<f64>,
    /// How long each step lasts.
    pub duration: Duration,
    /// How to push.
    pub mode: Mode,
    /// How long to wait after a step for messages in flight.
    pub drain: Duration,
    /// Print a progress line per step.
    pub progress: bool,
}

/// One load step's numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CeilingStep {
    /// Pushes per second asked for.
    pub target_rate: f64,
    /// Messages the server wrote.
    pub sent: u64,
    /// Messages the server could not write (connection gone, datagram refused).
    pub failed: u64,
    /// Messages that arrived.
    pub received: u64,
    /// Delivered pushes per second.
    pub pushes_per_s: f64,
    /// Write-to-receive latency.
    pub latency: LatencySummary,
    /// The server process's CPU over the step.
    pub server: ProcUsage,
    /// The driver's own CPU (all the clients) over the step: on a shared machine, a driver near
    /// a full core means the clients, not the server, set the latency.
    pub driver: ProcUsage,
}

impl CeilingStep {
    /// Share of the written messages that did not arrive.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }

    /// Whether the step held the comparison's latency bound without losing messages.
    pub fn within_bounds(&self) -> bool {
        self.latency.p99_ms < P99_BOUND_MS && self.loss() < LOSS_BOUND && self.failed == 0
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CeilingReport {
    /// How the server pushed.
    pub mode: Mode,
    /// Sessions.
    pub sessions: usize,
    /// Bytes per message.
    pub payload: usize,
    /// Seconds to connect all sessions.
    pub connect_s: f64,
    /// The steps.
    pub steps: Vec<CeilingStep>,
    /// The server's peak RSS, KiB.
    pub server_peak_rss_kb: u64,
}

impl CeilingReport {
    /// The highest delivered pushes/s of a step within bounds.
    pub fn max_pushes_per_s(&self) -> Option<f64> {
        self.steps
            .iter()
            .filter(|s| s.within_bounds())
            .map(|s| s.pushes_per_s)
            .max_by(f64::total_cmp)
    }

    /// Server CPU µs per push at the within-bounds step with the most pushes.
    pub fn cpu_us_per_push(&self) -> Option<f64> {
        self.steps
            .iter()
            .filter(|s| s.within_bounds())
            .max_by(|a, b| a.pushes_per_s.total_cmp(&b.pushes_per_s))
            .and_then(|s| s.server.cpu_us_per_push)
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut s = format!(
            "bare quinn push ceiling | {} mode | {} sessions | {} B messages | connected in {:.1} s | server peak RSS {:.0} MiB\n\n",
            self.mode,
            self.sessions,
            self.payload,
            self.connect_s,
            self.server_peak_rss_kb as f64 / 1024.0
        );
        s.push_str(&format!(
            "{:>9} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8}  {}\n",
            "target/s",
            "pushes/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "loss %",
            "srv cores",
            "µs/push",
            "drv cores",
            "failed",
            "ok"
        ));
        for st in &self.steps {
            s.push_str(&format!(
                "{:>9.0} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>9.4} {:>9.2} {:>8.1} {:>9.2} {:>8}  {}\n",
                st.target_rate,
                st.pushes_per_s,
                st.latency.p50_ms,
                st.latency.p99_ms,
                st.latency.max_ms,
                st.loss() * 100.0,
                st.server.cores,
                st.server.cpu_us_per_push.unwrap_or(f64::NAN),
                st.driver.cores,
                st.failed,
                if st.within_bounds() { "yes" } else { "no" },
            ));
        }
        match (self.max_pushes_per_s(), self.cpu_us_per_push()) {
            (Some(max), Some(us)) => s.push_str(&format!(
                "\nceiling: {max:.0} pushes/s within p99 < {P99_BOUND_MS} ms and loss < {:.1} %, at {us:.1} µs of server CPU per push\n",
                LOSS_BOUND * 100.0
            )),
            _ => s.push_str("\nceiling: no step stayed within bounds\n"),
        }
        s
    }
}

/// nearby's share of the bare push path, as markdown: each one's highest load within bounds and
/// its server CPU per push, and nearby's CPU per push against the bare path's at the nearest load.
pub fn share_markdown(ceiling: &CeilingReport, nearby: &crate::compare::Summary) -> String {
    let bare_max = ceiling.max_pushes_per_s();
    let bare_us = ceiling.cpu_us_per_push();
    // CPU seconds per million pushes is µs per push.
    let nearby_us = nearby.cpu_s_per_m_pushes;
    let nearest = nearest_load(
        ceiling
            .steps
            .iter()
            .filter(|s| s.server.cpu_us_per_push.is_some()),
        nearby.max_pushes_per_s,
        |s| s.pushes_per_s,
    );
    let cell = crate::compare::cell;
    let mut s = String::new();
    s.push_str("| push path | max pushes/s within bounds | server CPU µs per push there |\n");
    s.push_str("|---|---:|---:|\n");
    s.push_str(&format!(
        "| bare quinn ({} mode, {} sessions, {} B, no logic) | {} | {} |\n",
        ceiling.mode,
        ceiling.sessions,
        ceiling.payload,
        cell(bare_max, 0),
        cell(bare_us, 1)
    ));
    s.push_str(&format!(
        "| {} (receive, route, distance, push) | {:.0} | {} |\n",
        nearby.name,
        nearby.max_pushes_per_s,
        cell(nearby_us, 1)
    ));
    let share = bare_max.filter(|m| *m > 0.0).map(|m| nearby.max_pushes_per_s / m);
    s.push_str(&format!(
        "\n{}'s highest load within bounds is {} of the bare push path's",
        nearby.name,
        share.map_or("–".to_string(), |x| format!("{:.0} %", x * 100.0))
    ));
    if let (Some(st), Some(n)) = (nearest, nearby_us) {
        if let Some(b) = st.server.cpu_us_per_push.filter(|b| *b > 0.0) {
            s.push_str(&format!(
                "; at that load its server CPU per push is {:.2}× the bare path's ({n:.1} vs {b:.1} µs at {:.0} pushes/s)",
                n / b,
                st.pushes_per_s
            ));
        }
    }
    s.push_str(".\n");
    s
}

/// The item of `items` whose load (`load`, pushes/s) is nearest `target`.
fn nearest_load<T>(items: impl Iterator<Item = T>, target: f64, load: impl Fn(&T) -> f64) -> Option<T> {
    items.min_by(|a, b| (load(a) - target).abs().total_cmp(&(load(b) - target).abs()))
}

/// How far apart two steps' delivered pushes/s may be and still count as one load.
pub const EQUAL_LOAD_TOLERANCE: f64 = 0.1;

/// nearby's CPU per push against the bare path's at equal load, as markdown: for each step of
/// the bare path within bounds, nearby's step within bounds whose delivered pushes/s is nearest
/// and within [`EQUAL_LOAD_TOLERANCE`] of it. The fixed costs per second of both servers weigh
/// less per push the more pushes a second there are, so the two are compared only at one load
/// (the line of [`share_markdown`] compares each one's highest load).
pub fn equal_load_markdown(ceiling: &CeilingReport, nearby: &crate::report::Report) -> String {
    let mut rows = Vec::new();
    for bare in ceiling.steps.iter().filter(|s| s.within_bounds()) {
        let Some(b) = bare.server.cpu_us_per_push.filter(|b| *b > 0.0) else {
            continue;
        };
        let near = nearest_load(
            nearby.steps.iter().filter(|n| crate::compare::within_bounds(n)),
            bare.pushes_per_s,
            |n| n.pushes_per_s,
        )
        .filter(|n| (n.pushes_per_s - bare.pushes_per_s).abs() <= EQUAL_LOAD_TOLERANCE * bare.pushes_per_s);
        if let Some((n, us)) = near.and_then(|n| n.cpu_s_per_m_pushes().map(|us| (n, us))) {
            rows.push((bare.pushes_per_s, b, n.pushes_per_s, us));
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "| bare path pushes/s | its server CPU µs per push | nearby pushes/s (the nearest step) | nearby µs per push | nearby / bare |\n|---:|---:|---:|---:|---:|\n",
    );
    for (bp, b, np, n) in &rows {
        s.push_str(&format!(
            "| {bp:.0} | {b:.1} | {np:.0} | {n:.1} | {:.2} |\n",
            n / b
        ));
    }
    s
}

/// What the clients recorded, per step (index = step - 1).
struct Tally {
    received: Vec<AtomicU64>,
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Tally {
    fn record(&self, m: &[u8]) {
        let Some((step, at)) = parse_message(m) else {
            return;
        };
        let Some(i) = (step as usize).checked_sub(1) else {
            return;
        };
        if let (Some(count), Some(h)) = (self.received.get(i), self.latency.get(i)) {
            count.fetch_add(1, Ordering::Relaxed);
            let us = unix_nanos().saturating_sub(at) / 1000;
            if let Ok(mut h) = h.lock() {
                h.saturating_record(us.max(1));
            }
        }
    }
}

#[allow(clippy::print_stderr)] // progress lines are this tool's interface
fn progress(line: &str) {
    eprintln!("ceiling: {line}");
}

/// Connects the sessions to `server` and runs the steps.
pub async fn drive(
    config: &CeilingConfig,
    server: &mut ServerProcess,
) -> Result<CeilingReport, CeilingError> {
    let client_config = nearby_client::tls::client_config(&server.ca_pem)
        .map_err(|e| CeilingError::Connect(e.to_string()))?;
    let mut endpoints = Vec::new();
    for _ in 0..SHARED_ENDPOINTS {
        let bind: std::net::SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
        let mut e = quinn::Endpoint::client(bind).map_err(io("binding a client socket"))?;
        e.set_default_client_config(client_config.clone());
        endpoints.push(e);
    }
    let tally = Arc::new(Tally {
        received: config.rates.iter().map(|_| AtomicU64::new(0)).collect(),
        latency: config
            .rates
            .iter()
            .map(|_| Mutex::new(latency_histogram()))
            .collect(),
    });

    let started = Instant::now();
    let mut connecting = JoinSet::new();
    let mut conns = Vec::with_capacity(config.sessions);
    let mut next = 0usize;
    while conns.len() < config.sessions {
        while next < config.sessions && connecting.len() < CONNECT_CONCURRENCY {
            let endpoint = endpoints[next % endpoints.len()].clone();
            let addr = server.addr;
            connecting.spawn(async move {
                endpoint
                    .connect(addr, nearby_client::DEFAULT_SERVER_NAME)
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            });
            next += 1;
        }
        match connecting.join_next().await {
            Some(Ok(Ok(conn))) => conns.push(conn),
            Some(Ok(Err(e))) => return Err(CeilingError::Connect(e)),
            Some(Err(e)) => return Err(CeilingError::Connect(e.to_string())),
            None => break,
        }
    }
    let line = server.read_line()?;
    if line != "connected" {
        return Err(CeilingError::Protocol(format!(
            "expected `connected`, got {line:?}"
        )));
    }
    let connect_s = started.elapsed().as_secs_f64();
    if config.progress {
        progress(&format!("connected {} sessions in {connect_s:.1} s", conns.len()));
    }

    let mut readers = JoinSet::new();
    for conn in &conns {
        let conn = conn.clone();
        let tally = Arc::clone(&tally);
        match config.mode {
            Mode::Stream => readers.spawn(async move {
                let Ok(mut stream) = conn.accept_uni().await else {
                    return;
                };
                let mut m = [0u8; PAYLOAD];
                while stream.read_exact(&mut m).await.is_ok() {
                    tally.record(&m);
                }
            }),
            Mode::Datagram => readers.spawn(async move {
                while let Ok(m) = conn.read_datagram().await {
                    tally.record(&m);
                }
            }),
        };
    }

    let pid = server.pid();
    let mut steps = Vec::new();
    for (i, &rate) in config.rates.iter().enumerate() {
        let before: ProcSample = procstat::sample(pid)?;
        let me_before = procstat::sample(std::process::id())?;
        let t0 = Instant::now();
        server.send(&format!("step {rate} {}", config.duration.as_millis()))?;
        // The server answers when its step is over; its pipe is read off the async threads.
        let line = tokio::task::block_in_place(|| server.read_line())?;
        let wall = t0.elapsed().as_secs_f64();
        let after = procstat::sample(pid)?;
        let me_after = procstat::sample(std::process::id())?;
        let mut words = line.split_whitespace();
        let (sent, failed) = match (words.next(), words.next(), words.next()) {
            (Some("done"), Some(s), Some(f)) => (
                s.parse().map_err(|_| CeilingError::Protocol(line.clone()))?,
                f.parse().map_err(|_| CeilingError::Protocol(line.clone()))?,
            ),
            _ => {
                return Err(CeilingError::Protocol(format!(
                    "expected `done <sent> <failed>`, got {line:?}"
                )))
            }
        };
        // Wait (bounded) for messages in flight.
        let deadline = Instant::now() + config.drain;
        while tally.received[i].load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let received = tally.received[i].load(Ordering::Relaxed);
        let latency = tally.latency[i]
            .lock()
            .map(|h| LatencySummary::of(&h))
            .unwrap_or_default();
        let step = CeilingStep {
            target_rate: rate,
            sent,
            failed,
            received,
            pushes_per_s: received as f64 / wall,
            latency,
            server: ProcUsage::between(&before, &after, wall, received),
            driver: ProcUsage::between(&me_before, &me_after, wall, received),
        };
        if config.progress {
            progress(&format!(
                "step {}: {rate:.0}/s asked, {:.0} pushes/s delivered, p99 {:.2} ms, {:.1} µs server CPU per push",
                i + 1,
                step.pushes_per_s,
                step.latency.p99_ms,
                step.server.cpu_us_per_push.unwrap_or(f64::NAN)
            ));
        }
        steps.push(step);
    }
    let server_peak_rss_kb = procstat::sample(pid)?.peak_rss_kb;
    for c in &conns {
        c.close(quinn::VarInt::from_u32(0), b"done");
    }
    readers.abort_all();
    Ok(CeilingReport {
        mode: config.mode,
        sessions: conns.len(),
        payload: PAYLOAD,
        connect_s,
        steps,
        server_peak_rss_kb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_others_are_ignored() {
        let m = message(3, 99);
        let (step, at) = parse_message(&m).expect("a message");
        assert_eq!(step, 3);
        assert!(at > 0 && at <= unix_nanos());
        assert_eq!(parse_message(&m[..10]), None);
    }

    #[test]
    fn a_step_is_within_bounds_only_without_loss_and_under_the_p99_bound() {
        let step = |received, p99_ms, failed| CeilingStep {
            target_rate: 100.0,
            sent: 1000,
            failed,
            received,
            pushes_per_s: received as f64,
            latency: LatencySummary {
                p99_ms,
                ..LatencySummary::default()
            },
            server: ProcUsage::default(),
            driver: ProcUsage::default(),
        };
        assert!(step(1000, 5.0, 0).within_bounds());
        assert!(!step(990, 5.0, 0).within_bounds());
        assert!(!step(1000, 150.0, 0).within_bounds());
        assert!(!step(1000, 5.0, 1).within_bounds());
        let report = CeilingReport {
            mode: Mode::Stream,
            sessions: 1,
            payload: PAYLOAD,
            connect_s: 0.0,
            steps: vec![step(1000, 5.0, 0), step(900, 5.0, 0)],
            server_peak_rss_kb: 0,
        };
        assert_eq!(report.max_pushes_per_s(), Some(1000.0));
    }

    #[test]
    fn nearby_is_compared_with_the_bare_path_only_at_an_equal_load() {
        use crate::report::fixtures::{report, step};
        let ceiling = fixtures::report(vec![
            fixtures::step(10_000.0, 20.0),
            fixtures::step(20_000.0, 16.0),
        ]);
        // nearby's steps last 10 s (the fixture's).
        let nearby = report(vec![
            // 10.5 k pushes/s (within 10 % of 10 k): 1.8 CPU s over 105,000 pushes.
            step(1, 10_500.0, 1.0, 5.0, 0.0, 1.8),
            // 30 k pushes/s: no bare step near it.
            step(2, 30_000.0, 1.0, 5.0, 0.0, 3.0),
        ]);
        let table = equal_load_markdown(&ceiling, &nearby);
        let lines: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(lines.len(), 1, "{table}");
        assert!(
            lines[0].starts_with("| 10000 | 20.0 | 10500 | 17.1 | 0.86 |"),
            "{table}"
        );
        // Past its bounds a nearby step is not compared.
        let over = report(vec![step(1, 10_000.0, 1.0, 500.0, 0.0, 1.0)]);
        assert_eq!(equal_load_markdown(&ceiling, &over), "");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("stream".parse::<Mode>(), Ok(Mode::Stream));
        assert_eq!("datagram".parse::<Mode>(), Ok(Mode::Datagram));
        assert!("smoke".parse::<Mode>().is_err());
    }
}

/// Bare-path reports for other modules' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{CeilingReport, CeilingStep, Mode, PAYLOAD};
    use crate::metrics::{LatencySummary, ProcUsage};

    /// A step within bounds (p99 5 ms, nothing lost) over 10 s, its server at `us` per push.
    pub(crate) fn step(pushes_per_s: f64, us: f64) -> CeilingStep {
        CeilingStep {
            target_rate: pushes_per_s,
            sent: pushes_per_s as u64 * 10,
            failed: 0,
            received: pushes_per_s as u64 * 10,
            pushes_per_s,
            latency: LatencySummary {
                p99_ms: 5.0,
                ..LatencySummary::default()
            },
            server: ProcUsage {
                cpu_us_per_push: Some(us),
                ..ProcUsage::default()
            },
            driver: ProcUsage::default(),
        }
    }

    /// A stream-mode run of `steps`.
    pub(crate) fn report(steps: Vec<CeilingStep>) -> CeilingReport {
        CeilingReport {
            mode: Mode::Stream,
            sessions: 10,
            payload: PAYLOAD,
            connect_s: 0.1,
            steps,
            server_peak_rss_kb: 0,
        }
    }
}
