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
        .env(
            "RUST_LOG",
            std::env::var("DEV_LOG").unwrap_or_else(|_| "info".into()),
        )
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
fn logs_come_as_one_json_object_per_line_when_asked() {
    let dir = tempfile::TempDir::new().expect("tmp");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
    cmd.env("NEARBY_LOG_FORMAT", "json")
        .args(["dev", "--listen", "127.0.0.1:0", "--raft-listen", "127.0.0.1:0"])
        .arg("--data")
        .arg(dir.path())
        .arg("--home")
        .arg(dir.path().join("home"));
    let (child, rx) = spawn_logged(cmd);
    let lines = wait_for(&rx, "nearby dev node is ready");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    let ready: serde_json::Value = serde_json::from_str(lines.last().expect("a line")).expect("json");
    assert_eq!(ready["level"], "INFO");
    // A bad value is refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_nearby-node"))
        .args(["--log-format", "xml", "dev"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: text, json"));
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

/// Runs `nearby --json --user USER ARGS` with `home` as NEARBY_HOME.
fn nearby(home: &std::path::Path, user: u64, args: &[&str]) -> std::process::Output {
    Command::new(nearby_cli())
        .arg("--json")
        .args(["--user", &user.to_string()])
        .args(args)
        .env("NEARBY_HOME", home)
        .output()
        .expect("run nearby")
}

fn cli(home: &std::path::Path, user: u64, args: &[&str]) -> serde_json::Value {
    let out = nearby(home, user, args);
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

/// Like [`cli`], but retries while the cluster is between leaders (a fresh cluster elects its
/// leaders while the first commands arrive) and returns the error's code when it fails.
fn cli_result(home: &std::path::Path, user: u64, args: &[&str]) -> Result<serde_json::Value, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = nearby(home, user, args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "nearby {args:?} printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if out.status.success() {
            return Ok(v);
        }
        let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
        if code != "unavailable" || std::time::Instant::now() > deadline {
            return Err(code);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `nearby list` of `user` until `cond` holds on its friends, within 20 s.
fn list_until(home: &std::path::Path, user: u64, what: &str, cond: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = cli_result(home, user, &["list"]).expect("list");
        let friends = list["friends"].as_array().cloned().unwrap_or_default();
        if cond(&friends) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "user {user}: {what}; last list {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_three_node_dev_cluster_serves_followers_and_ghost_mode_through_the_cli() {
    let (dir, home, cluster) = DevCluster::start(3, 3);
    // Users spread over the groups (dev ranges split the id space evenly).
    // Ids whose 8 bytes cannot turn up in a file by chance (history files are searched).
    let (ann, bob) = (0x0123_4567_89ab_cdef_u64, u64::MAX / 2 + 9);
    for user in [ann, bob] {
        cli_result(&home, user, &["login"]).expect("login");
    }
    // ann lets bob follow: bob lists ann as "following", ann does not see bob.
    assert_eq!(
        cli_result(&home, ann, &["followers", "allow", &bob.to_string()]).expect("allow")["outcome"],
        "updated"
    );
    let followers = cli_result(&home, ann, &["followers", "list"]).expect("followers");
    assert_eq!(followers["followers"][0]["id"], bob, "{followers}");
    let following = cli_result(&home, bob, &["follow", "list"]).expect("following");
    assert_eq!(following["following"][0]["id"], ann, "{following}");
    cli_result(&home, ann, &["location", "set", "52.5200", "13.4050"]).expect("ann located");
    cli_result(&home, bob, &["location", "set", "52.5470", "13.4050"]).expect("bob located");
    list_until(&home, bob, "ann listed as followed", |f| {
        f.len() == 1 && f[0]["id"] == ann && f[0]["relation"] == "following"
    });
    let ann_sees = cli_result(&home, ann, &["list"]).expect("list");
    assert_eq!(ann_sees["friends"], serde_json::json!([]), "{ann_sees}");

    // Ghost mode: gone for bob at once, back when turned off.
    let ghost = cli_result(&home, ann, &["ghost", "on"]).expect("ghost");
    assert_eq!(
        (ghost["ghost"].as_str(), ghost["until"].as_str()),
        (Some("on"), Some("forever"))
    );
    let settings = cli_result(&home, ann, &["friends", "list"]).expect("friends list");
    assert_eq!(settings["ghost_until"], "forever", "{settings}");
    list_until(&home, bob, "ann hidden by ghost mode", |f| f.is_empty());
    cli_result(&home, ann, &["ghost", "off"]).expect("ghost off");
    list_until(&home, bob, "ann visible again after `ghost off`", |f| {
        f.len() == 1
    });
    let timed = cli_result(&home, ann, &["ghost", "90min"]).expect("ghost 90min");
    assert!(
        timed["until"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{timed}"
    );
    list_until(&home, bob, "ann hidden for 90 minutes", |f| f.is_empty());

    // Revoked: bob no longer lists ann; a bad argument is refused.
    cli_result(&home, ann, &["ghost", "off"]).expect("ghost off");
    list_until(
        &home,
        bob,
        "ann visible again after a timed ghost mode turned off",
        |f| f.len() == 1,
    );
    cli_result(&home, ann, &["followers", "revoke", &bob.to_string()]).expect("revoke");
    let list = cli_result(&home, bob, &["list"]).expect("list");
    assert_eq!(
        list["friends"],
        serde_json::json!([]),
        "revoked, still listed: {list}"
    );
    assert_eq!(
        cli_result(&home, ann, &["followers", "allow", &ann.to_string()]),
        Err("invalid_argument".to_string())
    );

    // Strangers: ann turns discoverable; bob (no longer following) and cat see her under
    // pseudonyms of their own, at a rounded distance, never her id.
    let cat = u64::MAX / 4 * 3 + 5;
    cli_result(&home, cat, &["login"]).expect("login");
    cli_result(&home, cat, &["location", "set", "52.5300", "13.4100"]).expect("cat located");
    assert_eq!(
        cli_result(&home, ann, &["discoverable", "on"]).expect("discoverable")["outcome"],
        "updated"
    );
    let mut pseudonyms = Vec::new();
    for viewer in [bob, cat] {
        let page = cli_result(&home, viewer, &["strangers"]).expect("strangers");
        let list = page["strangers"].as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 1, "{page}");
        let s = &list[0];
        assert_eq!(s["name"], format!("user {ann}"), "{page}");
        let mut keys: Vec<&str> = s
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["distance_m", "name", "pseudonym", "updated_at"], "{page}");
        let d = s["distance_m"].as_u64().expect("distance");
        assert!(d % 500 == 0 && d >= 500, "{page}");
        assert_eq!(page["more"], 0);
        pseudonyms.push(s["pseudonym"].as_str().expect("pseudonym").to_string());
    }
    assert_ne!(pseudonyms[0], pseudonyms[1], "two viewers share a pseudonym");
    cli_result(&home, ann, &["ghost", "on"]).expect("ghost");
    let page = cli_result(&home, cat, &["strangers"]).expect("strangers");
    assert_eq!(
        page["strangers"],
        serde_json::json!([]),
        "a ghost is listed: {page}"
    );

    // History: ann's location is recorded on the node leading her group; deleting it removes
    // it from every node's files.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = cli_result(&home, ann, &["history"]).expect("history");
        if h["points"].as_array().is_some_and(|p| p.len() == 1) {
            assert_eq!(h["complete"], true, "{h}");
            assert_eq!(h["points"][0]["lat"], 52.52, "{h}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no history: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = ann.to_le_bytes();
    let holds = || {
        (1..=3).any(|n| {
            files_under(&dir.path().join(format!("n{n}/history")))
                .iter()
                .any(|bytes| bytes.windows(8).any(|w| w == id))
        })
    };
    assert!(holds(), "ann's history is in no node's files");
    assert_eq!(
        cli_result(&home, ann, &["history", "delete"]).expect("delete")["outcome"],
        "updated"
    );
    let h = cli_result(&home, ann, &["history"]).expect("history");
    assert_eq!(h["points"], serde_json::json!([]), "{h}");
    assert!(!holds(), "a node's files still hold ann's deleted history");
    cluster.stop();
}

/// The contents of every file under `dir` (none if it does not exist).
fn files_under(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push(bytes);
            }
        }
    }
    out
}

/// A running `nearby-node dev --nodes N`: stopped with SIGTERM (it stops its children) when
/// dropped, so a failed test leaves no process behind; its log is printed if the test failed.
struct DevCluster {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl DevCluster {
    /// Starts `nearby-node dev --nodes NODES` on the loopback block 127.77.BLOCK.x (a block of
    /// its own per test, so concurrent tests never meet) and waits until it is ready. Returns
    /// its data directory (removed when dropped), its `NEARBY_HOME` and the cluster.
    fn start(nodes: u8, block: u8) -> (tempfile::TempDir, std::path::PathBuf, DevCluster) {
        let dir = tempfile::TempDir::new().expect("tmp");
        let home = dir.path().join("home");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
        cmd.args(["dev", "--nodes", &nodes.to_string()])
            .args(["--listen", &format!("127.77.{block}.1:7400")])
            .args(["--raft-listen", &format!("127.77.{block}.1:7401")])
            .arg("--data")
            .arg(dir.path())
            .arg("--home")
            .arg(&home);
        let (child, rx) = spawn_logged(cmd);
        let cluster = DevCluster { child, rx };
        wait_for(&cluster.rx, "nearby dev cluster is ready");
        (dir, home, cluster)
    }

    /// Stops the cluster and checks that it exited cleanly.
    fn stop(mut self) {
        let exit = self.terminate();
        assert!(exit.success(), "nearby-node dev exited with {exit}");
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.terminate();
        if std::thread::panicking() {
            let log: Vec<String> = self.rx.try_iter().collect();
            #[allow(clippy::print_stderr)] // a failed test's diagnostics, shown by the harness
            {
                eprintln!("the dev cluster's log:\n{}", log.join("\n"));
            }
        }
    }
}

/// `nodectl` (built next to `nearby-node`).
fn nodectl(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodectl"))
        .args(args)
        .env("NEARBY_HOME", home)
        .output()
        .expect("run nodectl")
}

fn nodectl_json(home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = nodectl(home, &all);
    assert!(
        out.status.success(),
        "nodectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nodectl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// One raw HTTP/1.0 exchange with an admin API: (status, body).
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_string())
}

/// Checks Prometheus' text format (0.0.4) strictly: every sample belongs to a family declared
/// by `# HELP` and `# TYPE` (counter, gauge or histogram) before it, names and labels are
/// well formed, values parse, a counter's name ends in `_total`, and a histogram's buckets are
/// cumulative and end with `+Inf` equal to its `_count`. Returns each sample's value by its
/// name and labels.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: std::collections::BTreeMap<String, String> = Default::default();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().expect("HELP name");
            assert!(name_ok(name), "bad name in {line:?}");
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().expect("TYPE name"), it.next().expect("TYPE kind"));
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line:?}");
            assert!(helped.contains(name), "TYPE before HELP: {line:?}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "a counter not named _total: {line:?}");
            }
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "declared twice: {line:?}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().expect("name");
        assert!(name_ok(name), "bad sample name {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .expect("labels in braces");
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    name_ok(k) && v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "bad label {line:?}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample of an undeclared family: {line:?}"
        );
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "sample twice: {line:?}"
        );
    }
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let buckets: Vec<(&String, &f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{family}_bucket{{")))
            .collect();
        let mut bounds: Vec<(f64, f64)> = buckets
            .iter()
            .map(|(k, v)| {
                let le = k
                    .split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .expect("le");
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le value")
                    },
                    **v,
                )
            })
            .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            bounds.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family}: buckets not cumulative"
        );
        assert_eq!(
            bounds.last().map(|b| b.0),
            Some(f64::INFINITY),
            "{family}: no +Inf bucket"
        );
        assert_eq!(
            bounds.last().map(|b| b.1),
            samples.get(&format!("{family}_count")).copied()
        );
    }
    samples
}

#[test]
fn an_operator_sees_the_cluster_and_moves_a_leader_with_nodectl() {
    let (_dir, home, cluster) = DevCluster::start(3, 4);

    // What `nearby-node dev` leaves for nodectl: every node's admin address, and the token,
    // private.
    let admins: Vec<String> = std::fs::read_to_string(home.join("admin"))
        .expect("NEARBY_HOME/admin")
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(admins.len(), 3, "{admins:?}");
    let token_file = home.join("admin-token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file)
        .expect("admin-token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the admin token is readable by others: {mode:o}");
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_string();

    // Any node answers for the whole cluster.
    let status = nodectl_json(&home, &["status"]);
    assert!(status["epoch"].as_u64().is_some_and(|e| e > 0), "{status}");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{status}");
    for n in nodes {
        assert_eq!(n["state"], "up", "{n}");
        assert!(
            admins.contains(&n["admin"].as_str().expect("admin").to_string()),
            "{n}"
        );
        assert!(n["stats"]["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{n}");
        assert!(n["stats"]["uptime_s"].as_u64().is_some(), "{n}");
    }
    let groups = nodectl_json(&home, &["groups"]);
    let list = groups["groups"].as_array().expect("groups");
    assert_eq!(list.len(), 4, "{groups}");
    for g in list {
        assert_eq!(g["replicas"].as_array().map(Vec::len), Some(3), "{g}");
        assert!(
            g["leader"].as_u64().is_some() && g["applied"].as_u64().is_some(),
            "{g}"
        );
    }
    // The human tables print too.
    let out = nodectl(&home, &["nodes"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("up"));

    // No token, no answer; a wrong one neither.
    assert_eq!(http(&admins[1], "GET", "/api/v1/status", None).0, 401);
    assert_eq!(
        http(
            &admins[1],
            "GET",
            "/api/v1/status",
            Some("wrong-token-wrong-token")
        )
        .0,
        401
    );

    // Every route the OpenAPI document lists is served: reads answer, changes are only checked
    // (dry run) and either would be done or are refused with a reason (draining one of three
    // nodes is, without --force).
    let (code, doc) = http(&admins[2], "GET", "/openapi.json", Some(&token));
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("openapi json");
    let g0 = &list[0];
    let other_voter = g0["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .find(|v| **v != g0["leader"])
        .expect("another voter")
        .clone();
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for method in methods.as_object().expect("methods").keys() {
            let concrete = path.replace("{id}", &g0["id"].to_string());
            let concrete = if method == "post" {
                format!("{concrete}?to={other_voter}&dry_run=true")
            } else {
                concrete
            };
            let (code, body) = http(&admins[0], &method.to_uppercase(), &concrete, Some(&token));
            let answered = code == 200 || (method == "post" && code == 409 && body.contains("\"error\""));
            assert!(answered, "{method} {concrete}: {code} {body}");
        }
    }
    assert_eq!(http(&admins[0], "GET", "/api/v1/nope", Some(&token)).0, 404);

    // Metrics parse as Prometheus text and say what the node holds.
    let (code, text) = http(&admins[0], "GET", "/metrics", Some(&token));
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text);
    for name in [
        "nearby_sessions",
        "nearby_updates_total",
        "nearby_pushes_total",
        "nearby_map_epoch",
    ] {
        assert!(samples.contains_key(name), "{name} missing:\n{text}");
    }
    // Every series the Grafana dashboard in deploy/ draws is one the node serves.
    let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/nearby.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).expect("dashboard")).expect("json");
    let mut drawn = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("nearby_"));
            for name in names {
                drawn += 1;
                assert!(
                    samples
                        .keys()
                        .any(|k| k == name || k.starts_with(&format!("{name}{{"))),
                    "the dashboard's panel {} draws {name}, which /metrics does not serve",
                    panel["title"]
                );
            }
        }
    }
    assert!(drawn >= 12, "the dashboard draws too little: {drawn} series");
    assert_eq!(
        samples
            .keys()
            .filter(|k| k.starts_with("nearby_group_term{"))
            .count(),
        4,
        "one term per replica held:\n{text}"
    );

    // Move a leader from the node leading the most groups to a voter leading the fewest (so
    // placement has nothing to even out afterwards).
    let leads = |node: u64| list.iter().filter(|g| g["leader"] == node).count();
    let busiest = (1..=3).max_by_key(|n| leads(*n)).expect("a node");
    let g = list
        .iter()
        .find(|g| g["leader"] == busiest)
        .expect("a group it leads");
    let id = g["id"].as_u64().expect("id");
    let to = g["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .filter(|v| *v != busiest)
        .min_by_key(|v| leads(*v))
        .expect("another voter");
    let (id_s, to_s) = (id.to_string(), to.to_string());
    let dry = nodectl(&home, &["transfer-leader", &id_s, "--to", &to_s, "--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        String::from_utf8_lossy(&dry.stdout).starts_with("would move"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    let still = nodectl_json(&home, &["groups"]);
    assert_eq!(
        still["groups"][0]["leader"], list[0]["leader"],
        "a dry run changed nothing"
    );
    let refused = nodectl(&home, &["transfer-leader", &id_s, "--to", "9"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds no voter"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let moved = nodectl(&home, &["transfer-leader", &id_s, "--to", &to_s]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let after = nodectl_json(&home, &["groups"]);
    let now = after["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|x| x["id"] == id)
        .expect("the group")
        .clone();
    assert_eq!(now["leader"], to, "{after}");
    cluster.stop();
}

#[test]
fn a_drained_node_hands_everything_over_and_leaves_while_users_stay_served() {
    let (_dir, home, cluster) = DevCluster::start(4, 5);
    // Two friends with homes spread over the id space.
    let (ann, bob) = (7_u64, u64::MAX / 4 * 3);
    for user in [ann, bob] {
        cli_result(&home, user, &["login"]).expect("login");
    }
    cli_result(&home, ann, &["friends", "add", &bob.to_string()]).expect("ask");
    cli_result(&home, bob, &["friends", "add", &ann.to_string()]).expect("accept");

    // Node 1 leads the meta group: the hardest one to empty.
    let status = nodectl_json(&home, &["status"]);
    assert_eq!(status["meta_leader"], 1, "{status}");
    let held = |s: &serde_json::Value| s["nodes"][0]["replicas"].as_u64().expect("replicas");
    assert!(held(&status) > 0, "{status}");

    // A dry run changes nothing; three nodes stay up, so no --force is needed.
    let dry = nodectl(&home, &["drain", "1", "--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(String::from_utf8_lossy(&dry.stdout).starts_with("would drain node 1"));
    assert_eq!(nodectl_json(&home, &["status"])["nodes"][0]["state"], "up");
    // Removing a node that is up is refused with the reason.
    let refused = nodectl(&home, &["remove", "1"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("drain it first"));

    // The drain waits until node 1 holds nothing, showing progress.
    let drained = nodectl(&home, &["drain", "1", "--timeout", "240"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    assert!(
        String::from_utf8_lossy(&drained.stderr).contains("node 1:"),
        "no progress shown"
    );
    let after = nodectl_json(&home, &["status"]);
    let n1 = &after["nodes"][0];
    assert_eq!(
        (
            n1["state"].as_str(),
            n1["replicas"].as_u64(),
            n1["leaders"].as_u64()
        ),
        (Some("draining"), Some(0), Some(0)),
        "{after}"
    );
    assert_eq!(
        (n1["meta_replica"].as_bool(), n1["meta_leader"].as_bool()),
        (Some(false), Some(false)),
        "{after}"
    );
    assert_ne!(after["meta_leader"], 1, "{after}");
    let groups = nodectl_json(&home, &["groups"]);
    for g in groups["groups"].as_array().expect("groups") {
        let replicas = g["replicas"].as_array().expect("replicas");
        assert_eq!(replicas.len(), 3, "{g}");
        assert!(!replicas.contains(&serde_json::json!(1)), "{g}");
    }

    // Users are served by the other nodes: locations (soft state, gone with the old leaders)
    // sent again, friends see each other.
    cli_result(&home, ann, &["location", "set", "52.5200", "13.4050"]).expect("ann located");
    cli_result(&home, bob, &["location", "set", "52.5470", "13.4050"]).expect("bob located");
    list_until(&home, ann, "bob listed after the drain", |f| {
        f.len() == 1 && f[0]["id"] == bob
    });

    // Then node 1 leaves the map.
    let removed = nodectl(&home, &["remove", "1"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    let nodes = nodectl_json(&home, &["nodes"]);
    let ids: Vec<u64> = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![2, 3, 4], "{nodes}");
    cluster.stop();
}
