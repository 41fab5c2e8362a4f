//! `nearby-loadsim`: make a world's import file, or run a world against a node and report.
//!
//! Printing the report is this binary's job, hence the allowed `print_*` lints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use nearby_loadsim::{driver, DriverConfig, Report, Step, World, WorldConfig};

/// Load simulator and correctness oracle for nearby-protocol backends.
#[derive(Parser)]
#[command(name = "nearby-loadsim", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a world and write its bulk-import file (for `nearby-node dev --import`) plus
    /// `<out>.world.json`, the parameters `run --world` reads.
    World {
        #[command(flatten)]
        world: WorldArgs,
        /// The import file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Drive a node with the world's online users and report (exit status 3 if any leak).
    Run(Box<RunArgs>),
    /// Compare two runs' JSON reports (nearby and the baseline): prints a markdown table.
    Compare {
        /// nearby's report.
        #[arg(long)]
        nearby: PathBuf,
        /// The baseline's report.
        #[arg(long)]
        baseline: PathBuf,
        /// A `ceiling --json-out` report: also print nearby's share of the bare push path.
        #[arg(long)]
        ceiling: Option<PathBuf>,
    },
    /// Measure the bare quinn push path on this machine (no logic: a server process pushing small
    /// messages round-robin to many sessions), in load steps.
    Ceiling(CeilingArgs),
    /// The server process of `ceiling` (started by it; commands on stdin).
    #[command(hide = true)]
    CeilingServer {
        #[arg(long)]
        sessions: usize,
        #[arg(long)]
        mode: nearby_loadsim::ceiling::Mode,
        #[arg(long)]
        ca_out: PathBuf,
    },
    /// The kill loop: a cluster of `nearby-node` processes under load and relation churn, nodes
    /// killed (`kill -9`, leaders preferred) and restarted again and again; judged for leaks,
    /// acknowledged writes lost on any replica, time to be served again, and crashes (exit
    /// status 3 if a promise was broken).
    Chaos(ChaosArgs),
    /// The fault harness's loop (`tests/faults/run.sh` makes the network namespaces and runs
    /// this inside one): faults drawn from a seed — kill -9, SIGSTOP, a link down, a minority
    /// partition, a one-way cut, packet loss, node-to-node delay, a full disk — applied one after another to a
    /// cluster under load and churn; judged for leaks, acknowledged writes lost on any
    /// replica, crashes and panics, readiness after every heal and peak memory (exit status 3
    /// if a promise was broken; the seed and schedule are printed to reproduce it).
    Faults(FaultsArgs),
    /// The operator's tool under load: `nodectl split`, `move`, `merge`, `drain`, `undrain` and
    /// `rebalance` on a cluster of `nearby-node` processes while clients run with relation and
    /// privacy churn; judged for leaks, misses (< 0.5 %), client errors, acknowledged writes
    /// lost on any replica and crashes, with the redirects per second during the drain (exit
    /// status 3 if a promise was broken).
    Operate(OperateArgs),
    /// Many groups, cheap: a cluster with no clients, its idle CPU per node once groups
    /// hibernate, and how long a killed node's groups take to get new leaders.
    Groups(GroupsArgs),
    /// A phone's radio, in real time: updates per user per minute, datagrams per user per hour
    /// and the freshness of nearby friends' positions, for the old client behaviour (updates
    /// every 30 s, a keep-alive every 5 s) against the node's cadence and the NAT-safe keep-alive.
    Radio(RadioArgs),
    /// Plot runs' JSON reports against each other: writes `latency.svg` (p99/p50 latency against
    /// delivered pushes/s) and `cpu.svg` (CPU seconds per million pushes) to `--out-dir`.
    Plot {
        /// A report as NAME=PATH; NAME labels its lines. Repeat for each system.
        #[arg(long = "report", value_name = "NAME=PATH", required = true, value_parser = named_path)]
        reports: Vec<(String, PathBuf)>,
        /// Directory for the SVG files (created if missing).
        #[arg(long)]
        out_dir: PathBuf,
        /// A `ceiling --json-out` report: the CPU plot also draws the bare push path.
        #[arg(long)]
        ceiling: Option<PathBuf>,
    },
}

/// A cluster of real processes under load and churn (`chaos`, `operate`).
#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    world: WorldArgs,
    /// The `nearby-node` binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Shard groups.
    #[arg(long, default_value_t = 8)]
    groups: u64,
    /// Updates per second over all participants.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Relation and privacy changes per second.
    #[arg(long, default_value_t = 2.0)]
    churn: f64,
    /// The clients' request timeout, seconds.
    #[arg(long, default_value_t = 2.0)]
    request_timeout: f64,
    /// The clients' QUIC keep-alive interval, seconds.
    #[arg(long, default_value_t = 1.0)]
    keep_alive: f64,
    /// The clients' QUIC idle timeout, seconds (how long a client that sends nothing takes to
    /// notice a dead node).
    #[arg(long, default_value_t = 3.0)]
    idle_timeout: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    fn setup(&self, dir: PathBuf) -> anyhow::Result<nearby_loadsim::chaos::LoadSetup> {
        Ok(nearby_loadsim::chaos::LoadSetup {
            dir,
            nodes: self.nodes,
            groups: self.groups,
            world: self.world.config()?,
            rate: self.rate,
            churn: self.churn,
            seed: self.world.seed,
            progress: !self.quiet,
            node_bin: self.node_bin.clone(),
            liveness: nearby_loadsim::chaos::Liveness {
                request_timeout: Duration::from_secs_f64(self.request_timeout),
                keep_alive: Duration::from_secs_f64(self.keep_alive),
                idle_timeout: Duration::from_secs_f64(self.idle_timeout),
            },
            netns: None,
            small_disk: None,
            delay_files: false,
        })
    }
}

/// `nearby-loadsim chaos`.
#[derive(Args)]
struct ChaosArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Where the nodes' files go (a fresh directory is made inside).
    #[arg(long, default_value = "./nearby-chaos")]
    dir: PathBuf,
    /// Kills to make.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Seconds a killed node stays down.
    #[arg(long, default_value_t = 2.0)]
    down: f64,
    /// Seconds between a node's return and the next kill.
    #[arg(long, default_value_t = 3.0)]
    between: f64,
}

/// `nearby-loadsim faults` (an option given twice: the last one counts, so a preset such as
/// `tests/faults/run.sh --short` can be overridden).
#[derive(Args)]
#[command(args_override_self = true)]
struct FaultsArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Where the nodes' files go (a fresh directory is made inside).
    #[arg(long, default_value = "./nearby-faults")]
    dir: PathBuf,
    /// Faults to apply.
    #[arg(long, default_value_t = 20)]
    faults: u32,
    /// Kinds of fault, comma-separated (kill, pause, isolate, partition, one-way, loss, delay,
    /// disk-full, clock); all by default.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<nearby_loadsim::faults::FaultKind>,
    /// Node `i` runs in the network namespace PREFIXi (made beforehand: `tests/faults/run.sh`).
    #[arg(long)]
    netns: Option<String>,
    /// The nodes' addresses in their namespaces: A.B.C.i.
    #[arg(long, default_value = "10.77.0")]
    hosts: String,
    /// The node whose data lives on a small disk (for the disk-full fault).
    #[arg(long, default_value_t = 1)]
    disk_node: u8,
    /// That disk's size, MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Shortest and longest a fault holds, seconds.
    #[arg(long, default_value_t = 1.0)]
    hold_min: f64,
    /// See `--hold-min`.
    #[arg(long, default_value_t = 4.0)]
    hold_max: f64,
    /// Seconds between every node being ready again and the next fault.
    #[arg(long, default_value_t = 2.0)]
    between: f64,
    /// Seconds within which every node must be ready again after a fault heals.
    #[arg(long, default_value_t = 30.0)]
    recovery_bound: f64,
    /// No node's resident memory may pass this, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_bound_mib: u64,
}

/// `nearby-loadsim operate`.
#[derive(Args)]
struct OperateArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Where the nodes' files go (a fresh directory is made inside).
    #[arg(long, default_value = "./nearby-operate")]
    dir: PathBuf,
    /// Seconds the load runs (the commands must be done `settle` seconds before its end).
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Seconds of load before the first command, and at least after the last.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// The operations: `operations` (split, move, merge, drain, undrain, rebalance),
    /// `upgrade` (the rolling upgrade: every node cordoned, restarted, let back, in turn),
    /// `restarts` (every node restarted by SIGTERM alone) or `transfers` (leaderships moved
    /// round their replicas).
    #[arg(long, value_enum, default_value_t = nearby_loadsim::operate::Script::Operations)]
    script: nearby_loadsim::operate::Script,
}

/// `nearby-loadsim groups`.
#[derive(Args)]
struct GroupsArgs {
    /// Where the nodes' files go (a fresh directory is made inside).
    #[arg(long, default_value = "./nearby-groups")]
    dir: PathBuf,
    /// The `nearby-node` binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Shard groups.
    #[arg(long, default_value_t = 256)]
    groups: u64,
    /// Seconds to wait after the cluster settles, for idle groups to hibernate.
    #[arg(long, default_value_t = 15.0)]
    settle: f64,
    /// Seconds each CPU measurement lasts.
    #[arg(long, default_value_t = 10.0)]
    window: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// `nearby-loadsim radio`.
#[derive(Args)]
struct RadioArgs {
    /// Where the node's files go (a fresh directory is made inside).
    #[arg(long, default_value = "./nearby-radio")]
    dir: PathBuf,
    /// The `nearby-node` binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Online users per profile (a multiple of 8).
    #[arg(long, default_value_t = 96)]
    users: u32,
    /// Seconds measured (real time; at least a few of the slowest cadence, 120 s).
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// `nearby-loadsim ceiling`: the bare quinn push path's ceiling on this machine.
#[derive(Args)]
struct CeilingArgs {
    /// Sessions (connections) to push to.
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    /// Pushes per second over all sessions; a comma-separated list runs steps back to back.
    #[arg(long, value_delimiter = ',', default_value = "10000,20000,30000,40000")]
    rate: Vec<f64>,
    /// Seconds each step lasts.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// `stream` (one uni stream per session, as nearby) or `datagram` (one datagram per push).
    #[arg(long, default_value = "stream")]
    mode: nearby_loadsim::ceiling::Mode,
    /// Seconds to wait after each step for messages in flight.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Run the server process on these CPUs (`taskset -c` syntax), apart from this driver.
    #[arg(long)]
    server_cpus: Option<String>,
    /// Put the server process into this cgroup once started (its directory, e.g. one with a CPU
    /// quota, as `tests/bench/compare.sh` makes for every server it measures).
    #[arg(long)]
    server_cgroup: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// The world's parameters (see `docs/loadsim.md`).
#[derive(Args, Clone)]
struct WorldArgs {
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of users.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Mean friend count (lowered to users/4 for small worlds).
    #[arg(long, default_value_t = 400.0)]
    mean_degree: f64,
    /// Largest friend count.
    #[arg(long, default_value_t = 5_000)]
    max_degree: usize,
    /// Number of cities.
    #[arg(long, default_value_t = 5)]
    cities: usize,
    /// Radius of a city, metres.
    #[arg(long, default_value_t = 6_000.0)]
    city_radius_m: f64,
    /// Share of friendships inside the user's city.
    #[arg(long, default_value_t = 0.8)]
    local_share: f64,
    /// Aim for this share of friendships within 8 km (sets the cities' radius, and the local
    /// share if needed; the world reports what it got). The default world's is ~0.7.
    #[arg(long)]
    near_share: Option<f64>,
    /// One-way follower grants, as a share of friendships.
    #[arg(long, default_value_t = 0.02)]
    follow_share: f64,
    /// Share of users online.
    #[arg(long, default_value_t = 0.1)]
    online: f64,
    /// Share of users driving (the rest walk).
    #[arg(long, default_value_t = 0.3)]
    drive_share: f64,
    /// Share of online users with sharing off.
    #[arg(long, default_value_t = 0.02)]
    sharing_off: f64,
    /// Share of online users hiding from one friend.
    #[arg(long, default_value_t = 0.02)]
    hidden: f64,
    /// Share of online users discoverable by strangers nearby.
    #[arg(long, default_value_t = 0.05)]
    discoverable: f64,
    /// Share of online users looking for strangers nearby.
    #[arg(long, default_value_t = 0.05)]
    strangers: f64,
    /// Simulated seconds between two updates of one user.
    #[arg(long, default_value_t = 30.0)]
    period: f64,
    /// Make the best-connected user a hub with this many friends, online (0: no hub).
    #[arg(long, default_value_t = 0)]
    hub_friends: usize,
}

impl WorldArgs {
    fn config(&self) -> Result<WorldConfig, nearby_loadsim::world::WorldError> {
        let config = WorldConfig {
            seed: self.seed,
            users: self.users,
            mean_degree: self.mean_degree,
            max_degree: self.max_degree,
            local_share: self.local_share,
            cities: self.cities,
            city_radius_m: self.city_radius_m,
            follow_share: self.follow_share,
            online: self.online,
            drive_share: self.drive_share,
            sharing_off: self.sharing_off,
            hidden: self.hidden,
            discoverable: self.discoverable,
            strangers: self.strangers,
            period_s: self.period,
            hub_friends: self.hub_friends,
        };
        match self.near_share {
            Some(share) => config.with_near_share(share),
            None => Ok(config),
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    world: WorldArgs,
    /// Read the world's parameters from a `<out>.world.json` written by `world` (overrides the
    /// world flags).
    #[arg(long)]
    world_file: Option<PathBuf>,
    /// The CLI's directory: `endpoint`, `ca.pem`, `server_name` are read from it as defaults.
    #[arg(long, env = "NEARBY_HOME")]
    home: Option<PathBuf>,
    /// `host:port` of the nodes, comma-separated (default: NEARBY_HOME/endpoint, one per line).
    #[arg(long)]
    endpoint: Option<String>,
    /// PEM certificate(s) to trust (default: NEARBY_HOME/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The name in the node's certificate (default: NEARBY_HOME/server_name, else localhost).
    #[arg(long)]
    server_name: Option<String>,
    /// Target updates/s over all online users; a comma-separated list runs load steps back to
    /// back (default: online users / period, i.e. real time).
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Seconds each step lasts.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Sessions connecting at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds to wait after the last step for pushes in flight.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// The clients' QUIC keep-alive interval, seconds. The comparison's 5 s keeps its
    /// accelerated steps honest; the SDK's default (what phones run) is 25.
    #[arg(long, default_value_t = 5.0)]
    keep_alive: f64,
    /// The clients' QUIC idle timeout, seconds (the SDK's default is 60).
    #[arg(long, default_value_t = 20.0)]
    idle_timeout: f64,
    /// The server's process id, to report its CPU time and peak RSS; a comma-separated list
    /// (a cluster's nodes) is reported as one system, summed.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// A second process (e.g. the baseline's redis-server), reported separately.
    #[arg(long)]
    extra_pid: Option<u32>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// The cluster's pseudonym key (`pseudonym.key`; `nearby-node dev` keeps it in
    /// `DATA/dev/`): with it the world's discoverable users and stranger listeners take part
    /// and the oracle judges what strangers see. Without it strangers are left out.
    #[arg(long)]
    pseudonym_key: Option<PathBuf>,
    /// How the simulated phones run: `sdk`, one SDK client each (reconnecting as an app does),
    /// or `batched`, all of them on one socket in one task — the same requests for a fraction
    /// of the generator's CPU, no reconnection.
    #[arg(long, value_enum, default_value_t = driver::Clients::Sdk)]
    clients: driver::Clients,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::World { world, out } => {
            let started = std::time::Instant::now();
            let config = world.config()?;
            let w = World::generate(config.clone())?;
            w.seed()
                .write(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let desc = world_file(&out);
            std::fs::write(&desc, serde_json::to_string_pretty(&config)?)
                .with_context(|| format!("cannot write {}", desc.display()))?;
            let s = w.summary();
            println!(
                "wrote {} and {} in {:.1} s: {} users ({} online), {} friendships (mean {:.0}, max {}), {} follows, {:.0} % of friends within 8 km",
                out.display(),
                desc.display(),
                started.elapsed().as_secs_f64(),
                s.users,
                s.online,
                s.friendships,
                s.mean_degree,
                s.max_degree,
                s.follows,
                s.friends_within_8km * 100.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => run_load(*args),
        Cmd::Compare {
            nearby,
            baseline,
            ceiling,
        } => {
            let read = nearby_loadsim::plot::read_report;
            let (nearby, baseline) = (read(&nearby)?, read(&baseline)?);
            let n = nearby_loadsim::compare::summarize("nearby", &nearby);
            let b = nearby_loadsim::compare::summarize("baseline (Redis)", &baseline);
            print!("{}", nearby_loadsim::compare::markdown(&n, &b));
            println!();
            print!(
                "{}",
                nearby_loadsim::compare::equal_load_markdown(&nearby, &baseline)
            );
            if let Some(path) = ceiling {
                let c = read_ceiling(&path)?;
                println!();
                print!("{}", nearby_loadsim::ceiling::share_markdown(&c, &n));
                let equal = nearby_loadsim::ceiling::equal_load_markdown(&c, &nearby);
                if !equal.is_empty() {
                    println!();
                    print!("At equal load:\n\n{equal}");
                }
            }
            // The table shows both systems' leaks; only nearby's fail the comparison (the
            // original design's may leak past its knee, and that is a finding, not an error).
            Ok(if n.leaks == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Ceiling(args) => ceiling(args),
        Cmd::Chaos(args) => chaos(args),
        Cmd::Faults(args) => faults(args),
        Cmd::Operate(args) => operate(args),
        Cmd::Groups(args) => groups(args),
        Cmd::Radio(args) => radio(args),
        Cmd::CeilingServer {
            sessions,
            mode,
            ca_out,
        } => {
            let opts = nearby_loadsim::ceiling::ServerOptions {
                sessions,
                mode,
                ca_out,
            };
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(nearby_loadsim::ceiling::serve(
                opts,
                std::io::BufReader::new(std::io::stdin()),
                std::io::stdout(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot {
            reports,
            out_dir,
            ceiling,
        } => {
            let reports = reports
                .into_iter()
                .map(|(name, path)| Ok((name, nearby_loadsim::plot::read_report(&path)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ceiling = ceiling.as_deref().map(read_ceiling).transpose()?;
            for path in nearby_loadsim::plot::write_plots(&reports, ceiling.as_ref(), &out_dir)? {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ceiling(args: CeilingArgs) -> anyhow::Result<ExitCode> {
    use nearby_loadsim::ceiling;
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rate must be positive numbers of pushes per second");
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let dir = std::env::temp_dir().join(format!("nearby-ceiling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = ceiling::CeilingConfig {
        sessions: args.sessions,
        rates: args.rate.clone(),
        duration: Duration::from_secs_f64(args.duration),
        mode: args.mode,
        drain: Duration::from_secs_f64(args.drain.max(0.0)),
        progress: !args.quiet,
    };
    let rt = runtime()?;
    let report = {
        let mut server =
            ceiling::ServerProcess::start(&exe, args.sessions, args.mode, &dir, args.server_cpus.as_deref())?;
        if let Some(cgroup) = &args.server_cgroup {
            server.join_cgroup(cgroup)?;
        }
        rt.block_on(ceiling::drive(&config, &mut server))
    };
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    println!("{}", report.table());
    write_json(args.json_out.as_deref(), &report)?;
    Ok(ExitCode::SUCCESS)
}

/// A `ceiling --json-out` report.
fn read_ceiling(path: &Path) -> anyhow::Result<nearby_loadsim::ceiling::CeilingReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a ceiling report", path.display()))
}

/// `NAME=PATH` of `plot --report`.
fn named_path(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got {s:?}")),
    }
}

/// `<out>.world.json` next to the import file.
fn world_file(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".world.json");
    PathBuf::from(name)
}

fn run_load(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.world_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str::<WorldConfig>(&text)
                .with_context(|| format!("{}: not a world description", path.display()))?
        }
        None => args.world.config()?,
    };
    let world = World::generate(config.clone())?;
    let home = args
        .home
        .clone()
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".nearby")));
    let from_home = |name: &str| -> Option<String> {
        let path = home.as_ref()?.join(name);
        std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
    };
    let endpoint = match args.endpoint.clone().or_else(|| from_home("endpoint")) {
        Some(e) => e,
        None => bail!(
            "no --endpoint, and no endpoint file in NEARBY_HOME (start `nearby-node dev` or pass --endpoint)"
        ),
    };
    let ca_pem = match &args.ca {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read --ca {}", path.display()))?
        }
        None => from_home("ca.pem").context("no --ca, and no ca.pem in NEARBY_HOME")?,
    };
    let server_name = args
        .server_name
        .clone()
        .or_else(|| from_home("server_name"))
        .unwrap_or_else(|| nearby_client::DEFAULT_SERVER_NAME.to_string());
    let online = world.online().len() as f64;
    let rates = if args.rate.is_empty() {
        vec![online / config.period_s]
    } else {
        args.rate.clone()
    };
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.drain.is_finite() && args.drain >= 2.0) {
        bail!("--drain must be at least the oracle's 2 s deadline");
    }
    if !(args.keep_alive.is_finite()
        && args.idle_timeout.is_finite()
        && args.keep_alive > 0.0
        && args.keep_alive < args.idle_timeout)
    {
        bail!("--keep-alive must be positive and shorter than --idle-timeout");
    }
    let steps: Vec<Step> = rates
        .iter()
        .map(|&rate| Step {
            rate,
            duration: Duration::from_secs_f64(args.duration),
        })
        .collect();
    for s in &steps {
        // The node allows 20 requests/s per session; above that updates are refused.
        if s.rate / online > 20.0 {
            eprintln!(
                "warning: {:.0} updates/s over {} sessions is {:.1}/s per session, above the node's 20/s limit",
                s.rate,
                online,
                s.rate / online
            );
        }
    }
    let mut dc = DriverConfig::new(endpoint.clone(), ca_pem, steps);
    dc.server_name = server_name;
    dc.connect_concurrency = args.connect_concurrency;
    dc.drain = Duration::from_secs_f64(args.drain);
    dc.keep_alive = Duration::from_secs_f64(args.keep_alive);
    dc.idle_timeout = Duration::from_secs_f64(args.idle_timeout);
    dc.progress = !args.quiet;
    dc.server_pids = args.server_pid;
    dc.extra_pid = args.extra_pid;
    dc.clients = args.clients;
    if let Some(path) = &args.pseudonym_key {
        dc.pseudonym_key = Some(
            nearby_node::secrets::read_pseudonym_key(path)
                .with_context(|| format!("cannot read --pseudonym-key {}", path.display()))?,
        );
    }

    let rt = runtime()?;
    let out = rt.block_on(driver::run(&world, dc))?;
    let (report, _) = Report::build(&world, &endpoint, &out);
    println!("{}", report.table());
    write_json(args.json_out.as_deref(), &report)?;
    if report.no_leaks() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} leak(s): a location reached someone who must not see it",
            report.total.leaks
        );
        Ok(ExitCode::from(3))
    }
}

fn groups(args: GroupsArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.join(format!("run-{}", std::process::id()));
    let config = nearby_loadsim::groups::GroupsConfig {
        dir: dir.clone(),
        node_bin: args.node_bin,
        nodes: args.nodes,
        groups: args.groups,
        settle: Duration::from_secs_f64(args.settle),
        window: Duration::from_secs_f64(args.window),
        progress: !args.quiet,
    };
    let rt = runtime()?;
    let report = rt.block_on(nearby_loadsim::groups::run(config))?;
    println!("{}", report.table());
    write_json(args.json_out.as_deref(), &report)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded runtime every async command runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Writes `report` as pretty JSON to `path`, if one was asked for.
fn write_json(path: Option<&std::path::Path>, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn radio(args: RadioArgs) -> anyhow::Result<ExitCode> {
    use nearby_loadsim::radio::{Profile, RadioConfig};
    let dir = args.dir.join(format!("run-{}", std::process::id()));
    let config = RadioConfig {
        dir: dir.clone(),
        node_bin: args.node_bin,
        users: args.users,
        duration: Duration::from_secs_f64(args.seconds),
        profiles: vec![
            Profile::before(),
            Profile::fixed_fast(),
            Profile::cadence_only(),
            Profile::after(),
        ],
        progress: !args.quiet,
    };
    let rt = runtime()?;
    let report = rt.block_on(nearby_loadsim::radio::run(config))?;
    println!("{}", report.table());
    write_json(args.json_out.as_deref(), &report)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.join(format!("run-{}", std::process::id()));
    let config = nearby_loadsim::chaos::ChaosConfig {
        load: args.load.setup(dir.clone())?,
        kills: args.kills,
        down: Duration::from_secs_f64(args.down),
        between: Duration::from_secs_f64(args.between),
    };
    let rt = runtime()?;
    let report = rt.block_on(nearby_loadsim::chaos::run(config))?;
    println!("{}", report.table());
    verdict(
        &report,
        &report.replicas,
        &report.crashes,
        report.passed(),
        args.load.json_out.as_deref(),
        &dir,
    )
}

fn faults(args: FaultsArgs) -> anyhow::Result<ExitCode> {
    use nearby_loadsim::faults::FaultKind;
    let dir = args.dir.join(format!("run-{}", std::process::id()));
    let mut load = args.load.setup(dir.clone())?;
    let kinds = if args.kinds.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.kinds.clone()
    };
    if let Some(prefix) = &args.netns {
        let parts: Vec<u8> = args
            .hosts
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("--hosts: three numbers, as 10.77.0")?;
        let host: [u8; 3] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("--hosts: three numbers, as 10.77.0"))?;
        load.netns = Some((
            nearby_loadsim::cluster::Netns {
                prefix: prefix.clone(),
            },
            host,
        ));
    }
    load.delay_files = kinds.contains(&FaultKind::Delay) || kinds.contains(&FaultKind::ClockJump);
    if kinds.contains(&FaultKind::DiskFull) {
        load.small_disk = Some((args.disk_node, args.disk_mib << 20));
    }
    let config = nearby_loadsim::faults::FaultsConfig {
        load,
        faults: args.faults,
        kinds,
        hold: (
            Duration::from_secs_f64(args.hold_min),
            Duration::from_secs_f64(args.hold_max),
        ),
        between: Duration::from_secs_f64(args.between),
        recovery_bound: Duration::from_secs_f64(args.recovery_bound),
        memory_bound_mib: args.memory_bound_mib,
    };
    let rt = runtime()?;
    let report = rt.block_on(nearby_loadsim::faults::run(config))?;
    println!("{}", report.table());
    if !report.passed() {
        println!(
            "the schedule (seed {}):\n{}",
            report.seed,
            report.schedule_lines()
        );
    }
    verdict(
        &report,
        &report.replicas,
        &report.crashes,
        report.passed(),
        args.load.json_out.as_deref(),
        &dir,
    )
}

fn operate(args: OperateArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.join(format!("run-{}", std::process::id()));
    let config = nearby_loadsim::operate::OperateConfig {
        load: args.load.setup(dir.clone())?,
        script: args.script,
        duration: Duration::from_secs_f64(args.duration),
        settle: Duration::from_secs_f64(args.settle),
    };
    let rt = runtime()?;
    let report = rt.block_on(nearby_loadsim::operate::run(config))?;
    println!("{}", report.table());
    verdict(
        &report,
        &report.replicas,
        &report.crashes,
        report.passed(),
        args.load.json_out.as_deref(),
        &dir,
    )
}

/// The end of a run on a cluster: what was lost and who crashed, the JSON report, and its
/// files removed if it passed, else kept (exit status 3).
fn verdict(
    report: &impl serde::Serialize,
    replicas: &nearby_loadsim::chaos::ReplicaCheck,
    crashes: &[String],
    passed: bool,
    json_out: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<ExitCode> {
    for line in replicas.lost.iter().take(20) {
        println!("  lost: {line}");
    }
    for c in crashes {
        println!("  crash: {c}");
    }
    write_json(json_out, report)?;
    kept_if_broken(passed, dir)
}

/// Removes a run's files if it passed; else keeps them and says where (exit status 3).
fn kept_if_broken(passed: bool, dir: &Path) -> anyhow::Result<ExitCode> {
    if passed {
        let _ = std::fs::remove_dir_all(dir);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: a promise was broken; the nodes' files are kept in {}",
            dir.display()
        );
        Ok(ExitCode::from(3))
    }
}
