//! Commit throughput and latency of one 3-replica shard group on loopback, over the real QUIC
//! transport and the real WAL (files in a temp directory, fsynced), with 1, 16 and 256
//! concurrent writers proposing friend and settings commands.
//!
//! Run: `cargo bench -p nearby-raft --bench commit` (`NEARBY_BENCH_SECS` sets the seconds per
//! step, default 5). Prints a markdown table for `docs/benchmarks.md`.

// A bench binary reports on the terminal: progress on stderr, the table on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_index::friends::UserRange;
use nearby_raft::transport::ClusterCa;
use nearby_raft::{Command, HostConfig, Node, RaftHost, ShardGroup};

const USERS: u64 = 10_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let secs: u64 = std::env::var("NEARBY_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let ca = ClusterCa::generate("bench").expect("ca");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::TempDir::new().expect("tmp")).collect();
    let mut hosts = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let cfg = HostConfig::new(
            i as u64 + 1,
            dir.path(),
            "127.0.0.1:0".parse().expect("addr"),
            ca.issue_node(i as u64 + 1).expect("tls"),
        );
        hosts.push(RaftHost::start(cfg).await.expect("host"));
    }
    let range = UserRange::new(1, USERS + 1).expect("range");
    let mut groups = Vec::new();
    for h in &hosts {
        groups.push(h.open_shard(1, range).await.expect("group"));
    }
    let members: BTreeMap<u64, Node> = hosts
        .iter()
        .map(|h| (h.node_id(), Node::new(h.addr(), "", "")))
        .collect();
    groups[0].initialize(members).await.expect("init");
    let leader = loop {
        if let Some(l) = groups[0].leader() {
            break groups[(l - 1) as usize].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("registering {USERS} users");
    let reg = Arc::new(leader.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64u64 {
        let g = Arc::clone(&reg);
        tasks.spawn(async move {
            let mut u = w + 1;
            while u <= USERS {
                g.propose(Command::RegisterUser {
                    user: u,
                    name: format!("user {u}"),
                })
                .await
                .expect("register");
                u += 64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}

    println!("| writers | commits/s | p50 ms | p99 ms | max ms | leader WAL records per fsync |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let leader_host = &hosts[(leader.raft().metrics().borrow().id - 1) as usize];
    for writers in [1usize, 16, 256] {
        let before = leader_host.wal().stats();
        let (n, mut lat, elapsed) = step(&leader, writers, Duration::from_secs(secs)).await;
        let after = leader_host.wal().stats();
        let per_sync = (after.records - before.records) as f64 / (after.syncs - before.syncs).max(1) as f64;
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
        println!(
            "| {writers} | {:.0} | {:.2} | {:.2} | {:.2} | {per_sync:.1} |",
            n as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
    }
    for h in &hosts {
        h.shutdown().await;
    }
}

async fn step(leader: &ShardGroup, writers: usize, dur: Duration) -> (u64, Vec<Duration>, Duration) {
    eprintln!("{writers} writers for {dur:?}");
    let start = Instant::now();
    let stop = start + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers as u64 {
        let g = leader.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < stop {
                let a = (w * 7919 + i * 104_729) % USERS + 1;
                let b = (a + 1 + i % 97) % USERS + 1;
                let cmd = match i % 3 {
                    0 => Command::SetSharing {
                        user: a,
                        on: i.is_multiple_of(2),
                    },
                    1 => Command::AddFriend { from: a, to: b },
                    _ => Command::Hide { user: a, from: b },
                };
                let t = Instant::now();
                if a != b {
                    g.propose(cmd).await.expect("commit");
                    lat.push(t.elapsed());
                }
                i += 1;
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("writer"));
    }
    (all.len() as u64, all, start.elapsed())
}
