//! Memory per idle online user: RSS of a real `nearby-node dev` process holding 1,000 and 5,000
//! idle sessions (each authenticated, with one location sent): on nearby's batched driver, on
//! quinn's tasks with nearby's transport settings, and on quinn's tasks with quinn's defaults.
//!
//! Run: `cargo bench -p nearby-node --bench idle` (`NEARBY_IDLE_SESSIONS=1000,5000` to choose;
//! `NEARBY_IDLE_SETUPS=batched,tasks,defaults` picks setups; `NEARBY_NODE_BIN` another binary).
//! The clients run in this process; the node is its own process, so its RSS is the node's alone.

#![allow(missing_docs, clippy::print_stdout, clippy::print_stderr)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_client::proto::Coord;
use nearby_client::{Client, ClientConfig};
use nearby_index::geo::Millis;
use nearby_node::auth::{Claims, TokenSigner};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn wait_for_file(path: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s;
            }
        }
        assert!(child.try_wait().expect("wait").is_none(), "the node exited");
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a node, holds `n` idle sessions, returns (RSS before, RSS with the sessions) in KiB.
async fn measure(n: usize, setup: Setup) -> (u64, u64) {
    let dir = tempfile::TempDir::new().expect("tmp");
    let home = dir.path().join("home");
    // `NEARBY_NODE_BIN` measures another build (e.g. an earlier one kept aside) in the same run.
    let bin = std::env::var_os("NEARBY_NODE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_nearby-node").into());
    let mut cmd = Command::new(bin);
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--raft-listen",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(dir.path().join("data"))
    .arg("--home")
    .arg(&home)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // Every session comes from 127.0.0.1: above the default per-address limits.
    cmd.args(["--driver", setup.driver, "--address-limit", "100000"]);
    if setup.quinn_defaults {
        cmd.arg("--quinn-defaults");
    }
    let mut child = cmd.spawn().expect("spawn nearby-node");
    let endpoint = wait_for_file(&home.join("endpoint"), &mut child)
        .trim()
        .to_string();
    let ca = std::fs::read_to_string(home.join("ca.pem")).expect("ca");
    let key = std::fs::read(dir.path().join("data/dev/token-key.pk8")).expect("dev key");
    let signer = Arc::new(TokenSigner::from_pkcs8(&key).expect("key"));
    let pid = child.id();
    let before = rss_kib(pid);

    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    let spread = u64::MAX / (n as u64 + 2);
    for i in 0..n {
        let (sem, signer, endpoint, ca) = (
            Arc::clone(&sem),
            Arc::clone(&signer),
            endpoint.clone(),
            ca.clone(),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let user = 1 + i as u64 * spread;
            let token = signer.sign(Claims {
                user,
                expires_at: Millis(u64::MAX / 2),
            });
            let client = Client::connect(ClientConfig::new(endpoint, ca, user, token))
                .await
                .expect("connect");
            let lat = 48.0 + (i % 1000) as f64 * 0.001;
            client
                .update_location(Coord { lat, lon: 2.35 })
                .await
                .expect("location");
            client
        });
    }
    let mut clients = Vec::with_capacity(n);
    while let Some(c) = tasks.join_next().await {
        clients.push(c.expect("client"));
    }
    // Let the node settle (keep-alives exchanged, buffers trimmed), then read its RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    // Stop the node first: closing thousands of clients one by one would wait on each.
    let _ = child.kill();
    let _ = child.wait();
    drop(clients);
    (before, after)
}

/// What carries the node's client connections.
#[derive(Clone, Copy)]
struct Setup {
    /// What `NEARBY_IDLE_SETUPS` calls it.
    key: &'static str,
    name: &'static str,
    driver: &'static str,
    quinn_defaults: bool,
}

const SETUPS: [Setup; 3] = [
    Setup {
        key: "batched",
        name: "nearby's batched driver",
        driver: "batched",
        quinn_defaults: false,
    },
    Setup {
        key: "tasks",
        name: "quinn tasks, nearby's settings",
        driver: "tasks",
        quinn_defaults: false,
    },
    Setup {
        key: "defaults",
        name: "quinn tasks, quinn's defaults",
        driver: "tasks",
        quinn_defaults: true,
    },
];

fn main() {
    let sizes: Vec<usize> = std::env::var("NEARBY_IDLE_SESSIONS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 5_000]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| transport | idle sessions | node RSS before (MiB) | with sessions (MiB) | per session (KiB) |"
    );
    println!("|---|---:|---:|---:|---:|");
    let chosen = std::env::var("NEARBY_IDLE_SETUPS").unwrap_or_default();
    for setup in SETUPS {
        if !chosen.is_empty() && !chosen.split(',').any(|k| k.trim() == setup.key) {
            continue;
        }
        for &n in &sizes {
            eprintln!("{n} idle sessions, {}", setup.name);
            let (before, after) = rt.block_on(measure(n, setup));
            println!(
                "| {} | {n} | {:.1} | {:.1} | {:.1} |",
                setup.name,
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                (after.saturating_sub(before)) as f64 / n as f64
            );
        }
    }
}
