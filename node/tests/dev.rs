//! `nearby-node dev` as a newcomer runs it: a real process, stopped with SIGTERM, started again
//! on the same data directory.

#[path = "dev/guide.rs"]
mod guide;
#[path = "dev/interop.rs"]
mod interop;

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

/// The admin API over HTTPS: `nodectl` that trusts the certificate's CA is served, by name
/// and by IP; without `--ca`, with another CA, or in plain HTTP it gets a clear error; a
/// configuration with half of the pair is refused, naming the missing field.
#[test]
fn the_admin_api_over_https_serves_only_clients_that_trust_its_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::TempDir::new().expect("tmp");
    let path = |name: &str| dir.path().join(name);
    let p = |name: &str| path(name).into_os_string();
    let o = |a: &str| std::ffi::OsString::from(a);
    for args in [
        vec![o("keygen"), o("--out"), p("keys")],
        vec![o("ca"), o("init"), o("--out"), p("ca")],
        vec![
            o("ca"),
            o("issue"),
            o("--ca"),
            p("ca"),
            o("--node-id"),
            o("1"),
            o("--out"),
            p("n1"),
        ],
        vec![o("admin-token"), o("--out"), p("admin-token")],
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (ok, err) = node_cmd(&args);
        assert!(ok, "{err}");
    }
    let secret = |name: &str, text: String| {
        std::fs::write(path(name), text).expect("write");
        std::fs::set_permissions(path(name), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let client = rcgen::generate_simple_self_signed(names.clone()).expect("cert");
    std::fs::write(path("cert.pem"), client.cert.pem()).expect("cert");
    secret("key.pem", client.signing_key.serialize_pem());
    // The admin API's own certificate (self-signed: it is its own CA), and a stranger's.
    let admin = rcgen::generate_simple_self_signed(names.clone()).expect("cert");
    std::fs::write(path("admin.pem"), admin.cert.pem()).expect("cert");
    secret("admin-key.pem", admin.signing_key.serialize_pem());
    let other = rcgen::generate_simple_self_signed(names).expect("cert");
    std::fs::write(path("other.pem"), other.cert.pem()).expect("cert");
    let config = |tls: &str| {
        format!(
            "node_id = 1\ndata = {data:?}\nlisten = \"127.0.0.1:0\"\nraft_listen = \"127.0.0.1:0\"\n\
             groups = 2\n\
             [cluster]\nca = {ca:?}\ncert = {ncert:?}\nkey = {nkey:?}\n\
             [tls]\ncert = {cert:?}\nkey = {key:?}\n[auth]\ntoken_public_key = {public:?}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {token:?}\n{tls}",
            data = path("data"),
            ca = path("n1/ca.pem"),
            ncert = path("n1/node.pem"),
            nkey = path("n1/node-key.pem"),
            cert = path("cert.pem"),
            key = path("key.pem"),
            public = path("keys/token.pub"),
            token = path("admin-token"),
        )
    };
    let file = path("node.toml");
    let conf = file.clone().into_os_string();
    std::fs::write(&file, config(&format!("tls_cert = {:?}\n", path("admin.pem")))).expect("config");
    let (ok, err) = node_cmd(&["init".as_ref(), "--config".as_ref(), &conf]);
    assert!(!ok && err.contains("admin.tls_key"), "{err}");
    std::fs::write(
        &file,
        config(&format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            path("admin.pem"),
            path("admin-key.pem")
        )),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearby-node"));
    cmd.args(["init", "--config"]).arg(&file);
    let (child, rx) = spawn_logged(cmd);
    let lines = wait_for(&rx, "nearby node is ready");
    let port = lines
        .iter()
        .find_map(|l| {
            let rest = l.split("admin API listening addr=Some(127.0.0.1:").nth(1)?;
            rest.split(')').next()?.parse::<u16>().ok()
        })
        .unwrap_or_else(|| panic!("no admin address in the log:\n{}", lines.join("\n")));
    let home = path("home");
    let run = |admin: &str, ca: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodectl"));
        cmd.args(["--json", "--admin", admin, "--token-file"])
            .arg(path("admin-token"))
            .arg("--home")
            .arg(&home)
            .env_remove("NEARBY_ADMIN_CA");
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(path(ca));
        }
        let out = cmd.arg("status").output().expect("run nodectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for admin in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let (ok, out, err) = run(&admin, Some("admin.pem"));
        assert!(ok, "{admin}: {err}");
        let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        assert!(status["epoch"].as_u64().is_some_and(|e| e > 0), "{out}");
        // One node: the cluster speaks this build's newest node-to-node protocol.
        assert_eq!(
            status["active_protocol"].as_u64(),
            Some(u64::from(nearby_raft::transport::tls::PEER_PROTOCOL)),
            "{out}"
        );
    }
    let https = format!("https://localhost:{port}");
    let (ok, _, err) = run(&https, None);
    assert!(!ok && err.contains("--ca"), "{err}");
    let (ok, _, err) = run(&https, Some("other.pem"));
    assert!(!ok && err.contains("certificate"), "{err}");
    let (ok, _, err) = run(&format!("127.0.0.1:{port}"), None);
    assert!(!ok, "plain HTTP was answered by the HTTPS listener: {err}");
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
    // bob's side is written when ann's group's intent is delivered to bob's group: soon after
    // ann's answer, not with it (ann's answer says her own record carries the grant).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let following = cli_result(&home, bob, &["follow", "list"]).expect("following");
        if following["following"][0]["id"] == ann {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob never lists ann: {following}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

    // The readiness probe needs no token (a kubelet has none); a settled cluster is ready on
    // every node.
    for a in &admins {
        let (code, body) = http(a, "GET", "/readyz", None);
        assert_eq!((code, body.trim()), (200, "ready"), "{a}");
    }

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
    // A member's node-to-node address: inviting it is refused at once.
    let member = {
        let (_, status) = http(&admins[0], "GET", "/api/v1/status", Some(&token));
        let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
        status["nodes"][1]["raft"]
            .as_str()
            .expect("raft address")
            .to_string()
    };
    // Every required query parameter the document lists is given, from these samples.
    let sample = |name: &str| -> String {
        match name {
            "addr" => member.clone(),
            "to" => other_voter.to_string(),
            "from" => g0["leader"].to_string(),
            "with" => list[1]["id"].to_string(),
            other => panic!("no sample value for the documented parameter `{other}`"),
        }
    };
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for (method, op) in methods.as_object().expect("methods") {
            let concrete = path.replace("{id}", &g0["id"].to_string());
            let mut query: Vec<String> = op["parameters"]
                .as_array()
                .expect("parameters")
                .iter()
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .map(|p| {
                    let name = p["name"].as_str().expect("name");
                    format!("{name}={}", sample(name))
                })
                .collect();
            if method == "post" {
                query.push("dry_run=true".into());
            }
            let concrete = if query.is_empty() {
                concrete
            } else {
                format!("{concrete}?{}", query.join("&"))
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

/// One raw HTTP/1.0 exchange with `extra` headers and a form `body`: (status, headers with
/// lower-case names, body).
fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Decodes standard base64 (what the DevTools protocol sends a screenshot in).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|c| *c != b'=').map(value).collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..data.len().max(1)]);
    }
    out
}

/// The Chromium to drive: `$CHROMIUM`, or `chromium` / `chromium-browser` on the PATH. Fails
/// with what to do when there is none: `tests/run` installs Debian's `chromium` as root.
fn chromium() -> std::path::PathBuf {
    let candidates: Vec<std::path::PathBuf> = match std::env::var_os("CHROMIUM") {
        Some(p) => vec![p.into()],
        None => vec!["chromium".into(), "chromium-browser".into()],
    };
    for c in &candidates {
        let works = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return c.clone();
        }
    }
    panic!(
        "the console test drives a headless Chromium, and none was found ({candidates:?}): \
         run the tests with `tests/run` (as root it installs Debian's `chromium`), or \
         `apt-get install chromium`, or set CHROMIUM to a Chromium binary"
    );
}

/// A headless Chromium driven over the DevTools protocol through a pipe
/// (`--remote-debugging-pipe`: it reads commands on fd 3 and writes answers on fd 4, each a
/// JSON text ended by NUL), so no WebSocket client is needed.
struct Browser {
    child: Child,
    commands: std::process::ChildStdin,
    answers: mpsc::Receiver<serde_json::Value>,
    next_id: u64,
    /// The page's session (flattened target attachment).
    session: String,
}

impl Browser {
    /// Starts Chromium with a fresh profile under `profile` and opens a 1400×1000 page.
    fn start(profile: &std::path::Path) -> Browser {
        let log = std::fs::File::create(profile.with_extension("log")).expect("chromium log");
        // fd 3 and 4 are the pipe's ends: the shell moves our stdin/stdout there.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium())
            .args([
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || loop {
            let mut buf = Vec::new();
            match out.read_until(0, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    buf.pop();
                    let Ok(v) = serde_json::from_slice(&buf) else {
                        continue;
                    };
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
        };
        let target = b.call("Target.createTarget", serde_json::json!({ "url": "about:blank" }));
        let attached = b.call(
            "Target.attachToTarget",
            serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().expect("a session id").to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        b
    }

    /// Sends one command (to the page once attached) and waits for its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("chromium did not answer {method} ({e})"));
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expr, "returnByValue": true }),
        );
        assert!(r["exceptionDetails"].is_null(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until `cond` holds on its value, within `within`; the value.
    fn eval_until(
        &mut self,
        expr: &str,
        within: Duration,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let v = self.eval(expr);
            if cond(&v) {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "{what}; last: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Closes the browser and waits for it to exit.
    fn close(mut self) {
        self.session.clear();
        use std::io::Write;
        let msg = b"{\"id\":999999,\"method\":\"Browser.close\"}\0";
        let _ = self.commands.write_all(msg);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The dataset the console page writes on `<body>` after each snapshot, as numbers.
const CONSOLE_STATE: &str = "JSON.stringify({path: location.pathname, ready: document.readyState, \
     data: Object.fromEntries(Object.entries(document.body ? document.body.dataset : {}).map(([k, v]) => [k, Number(v)])), \
     nodeRows: document.querySelectorAll('#nodes tr[data-node]').length, \
     groupRows: document.querySelectorAll('#groups tr[data-group]').length, \
     rangeBars: document.querySelectorAll('#ranges rect[data-group]').length, \
     cellDots: document.querySelectorAll('#map circle[data-cell]').length, \
     updatesShown: [...document.querySelectorAll('#nodes td.updates')].map(td => td.textContent), \
     operations: document.getElementById('operations') ? document.getElementById('operations').textContent : null})";

fn console_state(b: &mut Browser) -> serde_json::Value {
    let text = b.eval(CONSOLE_STATE);
    serde_json::from_str(text.as_str().expect("a JSON string")).expect("console state")
}

#[test]
fn an_operator_logs_in_to_the_console_and_watches_load_live_in_headless_chromium() {
    chromium(); // before anything else: no browser, no test (and a clear message)
    let (dir, home, cluster) = DevCluster::start(3, 6);
    let admins: Vec<String> = std::fs::read_to_string(home.join("admin"))
        .expect("NEARBY_HOME/admin")
        .lines()
        .map(String::from)
        .collect();
    let token = std::fs::read_to_string(home.join("admin-token"))
        .expect("token")
        .trim()
        .to_string();
    let admin = admins[0].as_str();

    // Without credentials: the page sends a browser to the login form, the API says 401.
    let (code, headers, _) = http_full(admin, "GET", "/console", &[], "");
    assert_eq!(
        (code, header_of(&headers, "location")),
        (303, Some("/console/login"))
    );
    let (code, _, body) = http_full(admin, "GET", "/api/v1/events", &[], "");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, headers, form) = http_full(admin, "GET", "/console/login", &[], "");
    assert_eq!(code, 200);
    assert!(header_of(&headers, "content-type").is_some_and(|t| t.starts_with("text/html")));
    assert!(form.contains("name=\"token\""), "{form}");

    // A wrong token: the form again, no cookie.
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    let (code, headers, body) = http_full(
        admin,
        "POST",
        "/console/login",
        &[form_type],
        "token=wrong-token-wrong-token",
    );
    assert_eq!(code, 401);
    assert!(header_of(&headers, "set-cookie").is_none(), "{headers:?}");
    assert!(body.contains("not the admin token") && body.contains("name=\"token\""));

    // The right one: a session cookie that is not the token, then the page.
    let (code, headers, _) = http_full(
        admin,
        "POST",
        "/console/login",
        &[form_type],
        &format!("token={token}"),
    );
    assert_eq!((code, header_of(&headers, "location")), (303, Some("/console")));
    let set_cookie = header_of(&headers, "set-cookie").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains(&token),
        "the cookie carries the token: {set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("name=value").to_string();
    let with_cookie = [("Cookie", cookie.as_str())];
    let (code, headers, page) = http_full(admin, "GET", "/console", &with_cookie, "");
    assert_eq!(code, 200);
    assert!(header_of(&headers, "content-security-policy").is_some_and(|p| p.contains("default-src 'none'")));
    assert!(page.contains("EventSource"), "not the console page");
    // The cookie reads, never changes; and it is this node's session only.
    let (code, _, _) = http_full(
        admin,
        "POST",
        "/api/v1/nodes/2/drain?dry_run=true",
        &with_cookie,
        "",
    );
    assert_eq!(code, 401, "a session cookie authorised a change");
    let (code, _, _) = http_full(&admins[1], "GET", "/console", &with_cookie, "");
    assert_eq!(code, 303, "another node knows this node's session");

    // The live feed, as the page reads it: a first snapshot of the whole cluster at once.
    let mut feed = std::net::TcpStream::connect(admin).expect("connect");
    feed.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    {
        use std::io::Write;
        write!(
            feed,
            "GET /api/v1/events HTTP/1.0\r\nHost: {admin}\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
        )
        .expect("write");
    }
    let mut feed_lines = BufReader::new(feed.try_clone().expect("clone"));
    let mut first = None;
    let mut seen = Vec::new();
    while first.is_none() {
        let mut line = String::new();
        let n = feed_lines.read_line(&mut line).expect("read the event stream");
        assert!(n > 0, "the event stream ended: {seen:?}");
        if let Some(data) = line.strip_prefix("data: ").filter(|_| {
            seen.last()
                .is_some_and(|l: &String| l.starts_with("event: snapshot"))
        }) {
            first = Some(serde_json::from_str::<serde_json::Value>(data.trim()).expect("snapshot json"));
        }
        seen.push(line);
    }
    assert!(seen[0].contains(" 200 "), "{seen:?}");
    assert!(
        seen.iter().any(|l| l
            .to_ascii_lowercase()
            .starts_with("content-type: text/event-stream")),
        "{seen:?}"
    );
    let snap = first.expect("a snapshot");
    assert_eq!(snap["nodes"].as_array().map(Vec::len), Some(3), "{snap}");
    assert_eq!(snap["groups"].as_array().map(Vec::len), Some(4), "{snap}");
    assert_eq!(snap["operations"], serde_json::json!([]), "{snap}");
    assert!(snap["epoch"].as_u64().is_some_and(|e| e > 0), "{snap}");

    // Load: bob watches (pushes), ann moves around him (updates), two more users elsewhere in
    // the world (the map's cells).
    let (ann, bob) = (11_u64, u64::MAX / 2 + 11);
    let (tokyo, new_york) = (u64::MAX / 4 + 3, u64::MAX / 4 * 3 + 3);
    for user in [ann, bob, tokyo, new_york] {
        cli_result(&home, user, &["login"]).expect("login");
    }
    cli_result(&home, ann, &["friends", "add", &bob.to_string()]).expect("ask");
    cli_result(&home, bob, &["friends", "add", &ann.to_string()]).expect("accept");
    cli_result(&home, tokyo, &["location", "set", "35.6762", "139.6503"]).expect("tokyo");
    cli_result(&home, new_york, &["location", "set", "40.7128", "-74.0060"]).expect("new york");
    let mut watcher = Command::new(nearby_cli())
        .args([
            "--json",
            "--user",
            &bob.to_string(),
            "watch",
            "--lat",
            "52.5200",
            "--lon",
            "13.4050",
        ])
        .env("NEARBY_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nearby watch");
    let watched = {
        let out = watcher.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (home, stop) = (home.clone(), std::sync::Arc::clone(&stop_load));
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let lat = format!("{:.5}", 52.5300 + f64::from(i % 50) * 0.0004);
                let _ = nearby(&home, ann, &["location", "set", &lat, "13.4100"]);
                i += 1;
            }
            i
        })
    };

    // The page in a real browser: sent to the login form, logged in through it, then live.
    let profile = dir.path().join("chromium-profile");
    let mut b = Browser::start(&profile);
    b.call(
        "Page.navigate",
        serde_json::json!({ "url": format!("http://{admin}/console") }),
    );
    b.eval_until(
        "location.pathname + ' ' + document.readyState",
        Duration::from_secs(20),
        "the browser was not sent to the login form",
        |v| v == "/console/login complete",
    );
    b.eval(&format!(
        "document.querySelector('input[name=token]').value = {}; document.querySelector('form').submit(); true",
        serde_json::Value::from(token.clone())
    ));
    let state = |v: &serde_json::Value, k: &str| v["data"][k].as_f64().unwrap_or(0.0);
    let first_seen = b.eval_until(
        CONSOLE_STATE,
        Duration::from_secs(30),
        "the console drew no snapshot",
        |v| {
            let v: serde_json::Value = serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or_default();
            v["path"] == "/console" && state(&v, "snapshots") >= 2.0 && state(&v, "updatesTotal") > 0.0
        },
    );
    let before: serde_json::Value = serde_json::from_str(first_seen.as_str().expect("json")).expect("state");
    assert_eq!(before["nodeRows"], 3, "{before}");
    assert_eq!(before["groupRows"], 4, "{before}");
    assert_eq!(before["rangeBars"], 4, "{before}");
    assert!(
        before["operations"]
            .as_str()
            .is_some_and(|t| t.contains("No operations")),
        "{before}"
    );
    // While the load runs, the numbers move: more snapshots, more updates and pushes, a
    // non-zero rate, and users on the map (Berlin, Tokyo, New York: three cells).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let now = console_state(&mut b);
        let moved = state(&now, "snapshots") >= state(&before, "snapshots") + 3.0
            && state(&now, "updatesTotal") > state(&before, "updatesTotal")
            && state(&now, "pushesTotal") > state(&before, "pushesTotal")
            && state(&now, "updatesPerS") > 0.0
            && state(&now, "cells") >= 3.0
            && now["cellDots"].as_u64() >= Some(3)
            && now["updatesShown"].as_array().is_some_and(|u| {
                u.iter().any(|t| {
                    t.as_str()
                        .and_then(|t| t.parse::<f64>().ok())
                        .is_some_and(|r| r > 0.0)
                })
            });
        if moved {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the console's numbers did not move under load: before {before}, now {now}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        watched.try_iter().count() > 0,
        "bob's `nearby watch` printed no event: the load pushed nothing"
    );

    // The artifact: a screenshot of the live page (for the docs, once the activity charts have
    // most of a minute to show).
    let for_docs = std::env::var("NEARBY_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
    if for_docs {
        b.eval_until(
            CONSOLE_STATE,
            Duration::from_secs(120),
            "the console stopped drawing",
            |v| {
                let v: serde_json::Value =
                    serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or_default();
                state(&v, "snapshots") >= 50.0
            },
        );
    }
    let shot = b.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }));
    let png = base64_decode(shot["data"].as_str().expect("png data"));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("console.png");
    std::fs::write(&artifact, &png).expect("write the screenshot");
    if for_docs {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console.png");
        std::fs::write(&docs, &png).expect("write docs/console.png");
    }
    b.close();
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.join().expect("load thread") > 0);
    let _ = watcher.kill();
    let _ = watcher.wait();

    // A stream still open does not hold the cluster up: it ends when its node stops.
    let pid = cluster.child.id();
    let stopper = std::thread::spawn(move || cluster.stop());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !stopper.is_finished() {
        if std::time::Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("the dev cluster did not stop within 60 s with a console stream open");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(panic) = stopper.join() {
        std::panic::resume_unwind(panic);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut feed_lines, &mut rest).expect("the event stream ends");
}

#[test]
fn a_group_splits_and_a_replica_moves_while_friends_stay_served() {
    let (_dir, home, cluster) = DevCluster::start(4, 7);
    // Three friends in the first group's range: ann stays, bob and cat go to the new group.
    let (ann, bob, cat) = (7_u64, 1_000_u64, 2_000_u64);
    for user in [ann, bob, cat] {
        cli_result(&home, user, &["login"]).expect("login");
    }
    for friend in [bob, cat] {
        cli_result(&home, ann, &["friends", "add", &friend.to_string()]).expect("ask");
        cli_result(&home, friend, &["friends", "add", &ann.to_string()]).expect("accept");
    }
    let groups = nodectl_json(&home, &["groups"]);
    let first = &groups["groups"][0];
    let group = first["id"].as_u64().expect("id");
    let end = first["range"][1].as_u64().expect("end");
    let before = groups["groups"].as_array().expect("groups").len();

    // A dry run changes nothing; a point outside the range is refused with the reason.
    let dry = nodectl(&home, &["split", &group.to_string(), "--at", "1000", "--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(String::from_utf8_lossy(&dry.stdout).starts_with("would split group"));
    let outside = nodectl(&home, &["split", &group.to_string(), "--at", &end.to_string()]);
    assert_eq!(
        outside.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );
    assert_eq!(
        nodectl_json(&home, &["groups"])["groups"]
            .as_array()
            .map(Vec::len),
        Some(before)
    );

    // The split runs as an operation, with progress, to the end.
    let split = nodectl(&home, &["split", &group.to_string(), "--at", "1000"]);
    assert!(
        split.status.success(),
        "{}",
        String::from_utf8_lossy(&split.stderr)
    );
    assert!(
        String::from_utf8_lossy(&split.stderr).contains("6/6"),
        "no progress shown"
    );
    let groups = nodectl_json(&home, &["groups"]);
    let list = groups["groups"].as_array().expect("groups");
    assert_eq!(list.len(), before + 1, "{groups}");
    let old = list.iter().find(|g| g["id"] == group).expect("old group");
    assert_eq!(old["range"][1], 1_000, "{old}");
    let new = list.iter().find(|g| g["range"][0] == 1_000).expect("new group");
    assert_eq!(new["range"][1], end, "{new}");
    assert!(new["leader"].is_u64(), "{new}");
    assert_eq!(new["users"], 2, "bob and cat went with their records: {new}");
    let ops = nodectl_json(&home, &["operations"]);
    assert_eq!(ops["operations"][0]["kind"], "split", "{ops}");
    assert_eq!(ops["operations"][0]["state"], "done", "{ops}");

    // No friendship moved or was lost: both sides still know it, across the new border.
    let friends = cli(&home, ann, &["friends", "list"]);
    let ids: Vec<u64> = friends["friends"]
        .as_array()
        .expect("friends")
        .iter()
        .filter_map(|f| f["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![bob, cat], "{friends}");
    for user in [ann, bob, cat] {
        cli_result(&home, user, &["location", "set", "52.5200", "13.4050"]).expect("located");
    }
    list_until(&home, ann, "bob and cat listed after the split", |f| f.len() == 2);
    // A relation change across the new border goes through the new group's intents.
    cli_result(&home, cat, &["friends", "remove", &ann.to_string()]).expect("unfriend");
    list_until(&home, ann, "cat gone after unfriending", |f| {
        f.len() == 1 && f[0]["id"] == bob
    });

    // Move one of the new group's replicas to the node that has none.
    let new_id = new["id"].as_u64().expect("id");
    let replicas: Vec<u64> = new["replicas"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r.as_u64())
        .collect();
    let to = (1..=4)
        .find(|n| !replicas.contains(n))
        .expect("a node without a replica");
    let from = new["leader"].as_u64().expect("leader");
    let moved = nodectl(
        &home,
        &[
            "move",
            &new_id.to_string(),
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ],
    );
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let groups = nodectl_json(&home, &["groups"]);
    let g = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"] == new_id)
        .expect("group");
    let now: Vec<u64> = g["replicas"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r.as_u64())
        .collect();
    assert!(now.contains(&to) && !now.contains(&from), "{g}");
    assert_ne!(g["leader"].as_u64(), Some(from), "{g}");
    cli_result(&home, bob, &["location", "set", "52.5210", "13.4050"]).expect("bob located");
    list_until(&home, ann, "bob still listed after the move", |f| {
        f.len() == 1 && f[0]["id"] == bob
    });

    // Merge the two back: the new group's replicas first go back onto the old group's nodes.
    let wrong = nodectl(&home, &["merge", &new_id.to_string(), &group.to_string()]);
    assert_eq!(wrong.status.code(), Some(2), "the lower range comes first");
    let merged = nodectl(&home, &["merge", &group.to_string(), &new_id.to_string()]);
    assert!(
        merged.status.success(),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    let groups = nodectl_json(&home, &["groups"]);
    let list = groups["groups"].as_array().expect("groups");
    assert_eq!(list.len(), before, "{groups}");
    let old = list.iter().find(|g| g["id"] == group).expect("old group");
    assert_eq!(
        (old["range"][0].as_u64(), old["range"][1].as_u64()),
        (Some(1), Some(end)),
        "{old}"
    );
    assert_eq!(old["users"], 3, "{old}");
    let ops = nodectl_json(&home, &["operations"]);
    let last = &ops["operations"][0];
    assert_eq!(
        (last["kind"].as_str(), last["state"].as_str()),
        (Some("merge"), Some("done")),
        "{ops}"
    );
    let friends = cli(&home, bob, &["friends", "list"]);
    assert_eq!(friends["friends"][0]["id"], ann, "{friends}");
    cli_result(&home, bob, &["location", "set", "52.5220", "13.4050"]).expect("bob located");
    list_until(&home, ann, "bob still listed after the merge", |f| {
        f.len() == 1 && f[0]["id"] == bob
    });
    cli_result(&home, bob, &["friends", "remove", &ann.to_string()]).expect("unfriend");
    list_until(&home, ann, "bob gone after unfriending", |f| f.is_empty());
    cluster.stop();
}

/// `nearby watch` processes (sessions that stay online), killed when dropped.
struct Watchers(Vec<Child>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn rebalance_spreads_the_busy_groups_of_one_node_at_the_pace_asked() {
    let (_dir, home, cluster) = DevCluster::start(3, 8);
    let groups = nodectl_json(&home, &["groups"]);
    let list = groups["groups"].as_array().expect("groups").clone();
    // Placement leaves one node leading two of the four groups: make both busy.
    let mut leading: std::collections::BTreeMap<u64, Vec<&serde_json::Value>> = Default::default();
    for g in &list {
        leading
            .entry(g["leader"].as_u64().expect("leader"))
            .or_default()
            .push(g);
    }
    let (&busy, hot) = leading
        .iter()
        .find(|(_, gs)| gs.len() == 2)
        .expect("a node leading two groups");
    let mut watchers = Watchers(Vec::new());
    let per_group = 3;
    for g in hot {
        let start = g["range"][0].as_u64().expect("start");
        for i in 0..per_group {
            let user = start + 10 + i;
            cli_result(&home, user, &["login"]).expect("login");
            let child = Command::new(nearby_cli())
                .args(["--user", &user.to_string(), "watch"])
                .env("NEARBY_HOME", &home)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nearby watch");
            watchers.0.push(child);
        }
    }
    let hot_ids: Vec<u64> = hot.iter().filter_map(|g| g["id"].as_u64()).collect();
    // The leaders count them online.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let groups = nodectl_json(&home, &["groups"]);
        let online: Vec<u64> = groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter(|g| hot_ids.contains(&g["id"].as_u64().unwrap_or(0)))
            .filter_map(|g| g["online"].as_u64())
            .collect();
        if online.len() == 2 && online.iter().all(|o| *o == per_group) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions not online: {groups}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The plan moves one busy group off the busy node and keeps leader counts even.
    let dry = nodectl(&home, &["rebalance", "--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let plan = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(plan.starts_with("would rebalance in 1 move(s)"), "{plan}");
    assert!(
        plan.contains(&format!("node {busy}: {}", 2 * per_group)),
        "{plan}"
    );
    let placed = |v: &serde_json::Value| -> Vec<(u64, u64, String)> {
        v["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .map(|g| {
                (
                    g["id"].as_u64().unwrap_or(0),
                    g["leader"].as_u64().unwrap_or(0),
                    g["replicas"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        placed(&nodectl_json(&home, &["groups"])),
        placed(&groups),
        "a dry run changes nothing"
    );

    let done = nodectl(&home, &["rebalance", "--rate", "60", "--max-concurrent", "1"]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("1/1"),
        "no progress shown"
    );
    let after = nodectl_json(&home, &["groups"]);
    let leaders_of_hot: Vec<u64> = after["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter(|g| hot_ids.contains(&g["id"].as_u64().unwrap_or(0)))
        .filter_map(|g| g["leader"].as_u64())
        .collect();
    assert_eq!(leaders_of_hot.len(), 2);
    assert_ne!(
        leaders_of_hot[0], leaders_of_hot[1],
        "the busy groups on two nodes: {after}"
    );
    // Balanced now: nothing more to do.
    let again = nodectl(&home, &["rebalance", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("nothing to do"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    // The moved group's sessions followed its leader: still online.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let groups = nodectl_json(&home, &["groups"]);
        let online: u64 = groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter_map(|g| g["online"].as_u64())
            .sum();
        if online == 2 * per_group {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions did not come back: {groups}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(watchers);
    cluster.stop();
}
