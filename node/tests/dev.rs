//! `nearby-node dev` as a newcomer runs it: a real process, stopped with SIGTERM, started again
//! on the same data directory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn start(data: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--raft-listen",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(data)
    .arg("--home")
    .arg(data.join("home"));
    spawn_logged(cmd)
}

/// Starts `cmd` with its log (stderr) sent line by line to the returned receiver.
fn spawn_logged(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
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
        lines
            .iter()
            .filter(|l| l.contains("now leading this group"))
            .count(),
        4,
        "{}",
        lines.join("\n")
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

/// The `nearby` CLI, built next to `nearby-node` by `cargo test --workspace`.
fn nearby_cli() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_nearby-node")).with_file_name("nearby");
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build it",
        path.display()
    );
    path
}

fn cli(home: &std::path::Path, user: u64, args: &[&str]) -> serde_json::Value {
    let out = Command::new(nearby_cli())
        .arg("--json")
        .args(["--user", &user.to_string()])
        .args(args)
        .env("NEARBY_HOME", home)
        .output()
        .expect("run nearby");
    assert!(
        out.status.success(),
        "nearby {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nearby {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn a_newcomer_sees_two_friends_with_the_readme_commands() {
    let dir = tempfile::TempDir::new().expect("tmp");
    let home = dir.path().join("home");
    let (child, rx) = start(dir.path());
    wait_for(&rx, "nearby dev node is ready");

    for user in [1, 2] {
        assert_eq!(cli(&home, user, &["login"])["ok"], true);
    }
    assert_eq!(
        cli(&home, 1, &["friends", "add", "2"])["outcome"],
        "friend_request_sent"
    );
    assert_eq!(
        cli(&home, 2, &["friends", "add", "1"])["outcome"],
        "friendship_formed"
    );
    cli(&home, 1, &["location", "set", "52.5200", "13.4050"]);
    let moved = cli(&home, 2, &["location", "set", "52.5470", "13.4050"]);
    assert_eq!(moved["friends"][0]["id"], 1, "{moved}");
    let list = cli(&home, 1, &["list"]);
    let friends = list["friends"].as_array().expect("friends array");
    assert_eq!(friends.len(), 1, "{list}");
    assert_eq!(friends[0]["id"], 2);
    let d = friends[0]["distance_m"].as_f64().expect("distance");
    assert!((d - 3_002.3).abs() < 30.0, "distance {d}");
    assert!(
        friends[0]["updated_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{list}"
    );
    let f = cli(&home, 1, &["friends", "list"]);
    assert_eq!(f["friends"][0]["relation"], "friend", "{f}");
    terminate(child, &rx);
}

/// Runs `nearby-node` with `args` to completion; returns (success, stderr).
fn node_cmd(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nearby-node"))
        .args(args)
        .output()
        .expect("nearby-node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_mode_starts_from_a_config_file_and_bad_configs_name_the_field() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::TempDir::new().expect("tmp");
    let p = |name: &str| dir.path().join(name).into_os_string();
    let (ok, err) = node_cmd(&["keygen".as_ref(), "--out".as_ref(), &p("keys")]);
    assert!(ok, "{err}");
    // Key files are never overwritten silently.
    let (ok, err) = node_cmd(&["keygen".as_ref(), "--out".as_ref(), &p("keys")]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, err) = node_cmd(&["ca".as_ref(), "init".as_ref(), "--out".as_ref(), &p("ca")]);
    assert!(ok, "{err}");
    let (ok, err) = node_cmd(&[
        "ca".as_ref(),
        "issue".as_ref(),
        "--ca".as_ref(),
        &p("ca"),
        "--node-id".as_ref(),
        "1".as_ref(),
        "--out".as_ref(),
        &p("n1"),
    ]);
    assert!(ok, "{err}");
    let mode = |f: &str| {
        std::fs::metadata(dir.path().join(f))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca/ca-key.pem"), 0o600);
    assert_eq!(mode("n1/node-key.pem"), 0o600);
    assert_eq!(mode("keys/token-key.pk8"), 0o600);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).expect("cert");
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).expect("key");
    let config = |radius: u32, groups: u32| {
        format!(
            "node_id = 1\ndata = {data:?}\nlisten = \"127.0.0.1:0\"\nraft_listen = \"127.0.0.1:0\"\n\
             groups = {groups}\n\
             [cluster]\nca = {ca:?}\ncert = {ncert:?}\nkey = {nkey:?}\n\
             [tls]\ncert = {cert:?}\nkey = {key:?}\n[auth]\ntoken_public_key = {public:?}\n\
             [presence]\nradius_m = {radius}\n",
            data = dir.path().join("data"),
            ca = dir.path().join("n1/ca.pem"),
            ncert = dir.path().join("n1/node.pem"),
            nkey = dir.path().join("n1/node-key.pem"),
            cert = dir.path().join("cert.pem"),
            key = dir.path().join("key.pem"),
            public = dir.path().join("keys/token.pub"),
        )
    };
    let file = dir.path().join("node.toml");
    let conf = file.clone().into_os_string();
    std::fs::write(&file, config(1, 4)).expect("config");
    let (ok, err) = node_cmd(&["init".as_ref(), "--config".as_ref(), &conf]);
    assert!(
        !ok && err.contains("presence.radius_m"),
        "the error does not name the field: {err}"
    );

    // A private key others can read is refused, and the error says how to fix it.
    std::fs::write(&file, config(5_000, 4)).expect("config");
    let (ok, err) = node_cmd(&["init".as_ref(), "--config".as_ref(), &conf]);
    assert!(!ok && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(dir.path().join("key.pem"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");

    // `run` on a fresh directory refuses: a cluster is initialised explicitly.
    let (ok, err) = node_cmd(&["run".as_ref(), "--config".as_ref(), &conf]);
    assert!(!ok && err.contains("nearby-node init"), "{err}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
    cmd.args(["init", "--config"]).arg(&file);
    let (child, rx) = spawn_logged(cmd);
    let lines = wait_for(&rx, "nearby node is ready");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("now leading this group"))
            .count(),
        4
    );
    terminate(child, &rx);

    // `init` again is refused; `run` with another `groups` value keeps the cluster's ranges.
    let (ok, err) = node_cmd(&["init".as_ref(), "--config".as_ref(), &conf]);
    assert!(!ok && err.contains("already belongs to cluster"), "{err}");
    std::fs::write(&file, config(5_000, 9)).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
    cmd.args(["run", "--config"]).arg(&file);
    let (child, rx) = spawn_logged(cmd);
    let lines = wait_for(&rx, "nearby node is ready");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("now leading this group"))
            .count(),
        4,
        "the restart did not keep the cluster's 4 ranges:\n{}",
        lines.join("\n")
    );
    terminate(child, &rx);
}
