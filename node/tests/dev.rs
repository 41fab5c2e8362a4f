//! `nearby-node dev` as a newcomer runs it: a real process, stopped with SIGTERM, started again
//! on the same data directory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn start(data: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nearby-node"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data)
        .arg("--home")
        .arg(data.join("home"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn nearby-node");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a log line containing `needle`, returning every line seen.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("no {needle:?} in the node's log ({e}); saw:\n{}", seen.join("\n")),
        }
    }
}

fn terminate(mut child: Child, rx: &mpsc::Receiver<String>) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for(rx, "raft host stopped");
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "nearby-node exited with {exit}");
}

#[test]
fn dev_node_starts_stops_cleanly_and_recovers_its_groups() {
    let dir = tempfile::TempDir::new().expect("tmp");
    let (child, rx) = start(dir.path());
    let lines = wait_for(&rx, "nearby dev node is ready");
    assert_eq!(
        lines.iter().filter(|l| l.contains("shard group ready")).count(),
        4
    );
    // The CLI's files are where the README says.
    let endpoint = std::fs::read_to_string(dir.path().join("home/endpoint")).expect("endpoint");
    assert!(
        endpoint.trim().parse::<std::net::SocketAddr>().is_ok(),
        "endpoint {endpoint:?}"
    );
    let ca = std::fs::read_to_string(dir.path().join("home/ca.pem")).expect("ca.pem");
    assert!(ca.contains("BEGIN CERTIFICATE"));
    terminate(child, &rx);
    assert!(dir.path().join("wal").read_dir().expect("wal dir").count() >= 2);

    // Again on the same directory: the groups come back from their files.
    let (child, rx) = start(dir.path());
    let lines = wait_for(&rx, "nearby dev node is ready");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("wal opened") && !l.contains("records: 0")),
        "the second start replayed nothing:\n{}",
        lines.join("\n")
    );
    terminate(child, &rx);
}

#[test]
fn a_second_dev_node_on_the_same_data_is_refused() {
    let dir = tempfile::TempDir::new().expect("tmp");
    let (child, rx) = start(dir.path());
    wait_for(&rx, "nearby dev node is ready");
    let out = Command::new(env!("CARGO_BIN_EXE_nearby-node"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path())
        .arg("--home")
        .arg(dir.path().join("home2"))
        .output()
        .expect("second node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another process"),
        "unexpected error: {err}"
    );
    terminate(child, &rx);
}
