//! `nearby-loadsim`: drives any backend that speaks the nearby client protocol with a seeded
//! synthetic world — one real SDK client per online user, over real QUIC — and checks every
//! delivered event against the truth.
//!
//! ```text
//! World (seed) ──► seed file ──► nearby-node dev --import      (users, friendships, follows)
//!      │
//!      └──► driver: Client per online user ──QUIC──► node ──► events ──► recorded
//!                                                                          │
//!                         oracle (pure): leaks, misses, latency ◄──────────┘
//!                                          │
//!                                          └──► report: table + JSON
//! ```
//!
//! See `docs/loadsim.md` for the model, the oracle's exact definitions and the commands.
//!
//! # Layout
//!
//! - [`world`]: the synthetic world (users, friend graph, cities, who is online, settings,
//!   movement), pure and deterministic from a seed; [`world::World::seed`] is the import file.
//! - [`ceiling`]: the bare quinn push path's ceiling on this machine (a server process pushing
//!   small messages with no logic), to read nearby's CPU per push against.
//! - [`compare`]: two runs' reports → each system's max load within the bounds, and ratios.
//! - [`driver`]: the only module with I/O towards the node — connects the clients, applies
//!   settings, sends updates on schedule in load steps, records every event with its time.
//! - [`oracle`]: pure judgement of what was sent against what was received: leaks, misses,
//!   update → push latency.
//! - [`metrics`]: rates, percentiles, start-up latency, errors by code, process CPU and memory,
//!   from the records.
//! - [`procstat`]: reading a process's CPU time and peak memory from `/proc`.
//! - [`cluster`]: a cluster of real `nearby-node` processes (start, kill, restart, read maps
//!   and replicas), for the cluster tests, `chaos` and `groups`.
//! - [`churn`]: relation and privacy changes during a run, and their timeline for the oracle.
//! - [`chaos`]: the kill loop — a cluster under load and churn, nodes killed and restarted.
//! - [`operate`]: `nodectl` split, move, merge, drain and rebalance on a cluster under load
//!   and churn, with redirects counted and the oracle's verdict.
//! - [`faults`]: the fault harness's loop: nodes in network namespaces, faults drawn from a seed
//!   (kills, pauses, isolation, partitions, one-way cuts, loss, a full disk), judged like the
//!   kill loop, with time to be ready again and peak memory.
//! - [`groups`]: a cluster's idle CPU with many hibernating groups, and election time.
//! - [`report`]: the report as a table and as JSON.
//! - [`plot`]: reports of several systems drawn against each other as SVG (latency and CPU per
//!   push against load).
//! - `src/main.rs`: the `nearby-loadsim` command line (`world`, `run`, `compare`, `plot`,
//!   `ceiling`, `chaos`, `faults`, `operate`, `groups`, `radio`); the only place `anyhow` is used.

pub mod ceiling;
pub mod chaos;
pub mod churn;
pub mod cluster;
pub mod compare;
pub mod driver;
pub mod faults;
pub mod groups;
pub mod metrics;
pub mod operate;
pub mod oracle;
pub mod plot;
pub mod procstat;
pub mod radio;
pub mod report;
pub mod world;

pub use self::driver::{DriverConfig, RunOutput, Step};
pub use self::oracle::{OracleConfig, Truth, Verdict};
pub use self::report::Report;
pub use self::world::{World, WorldConfig};
