//! The operations guide, run as written: the `sh procedure` blocks of `docs/operations.md` are
//! fed, in order, to one `bash` (so `cd`, `export` and background nodes carry from one block to
//! the next), while users stay online through all of it — signed in with tokens from the guide's
//! own token key, as an app's login service would issue them, friends across the range the guide
//! splits. Between blocks the test does what the guide says happens outside it (a node's machine
//! dies) and checks that every user is served again.

// A failed run's transcript, and the users' errors, are this test's diagnostics.
#![allow(clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nearby_client::proto::Coord;
use nearby_client::{Client, ClientConfig, Millis};
use nearby_node::auth::{Claims, TokenSigner};

/// The guide's procedures, by the heading they stand under, in the order they must run.
const SECTIONS: [&str; 7] = [
    "Start a cluster",
    "Start a cluster",
    "Add a node",
    "Drain a node and take it out",
    "Replace a failed node",
    "Split a hot range",
    "Rolling upgrade",
];

/// Users online during the run: pairs of friends, user `i` with user `i + USERS / 2`.
const USERS: u64 = 16;

/// The `sh procedure` blocks of the guide, with the `###` heading each stands under.
fn procedures() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let guide = std::fs::read_to_string(&path).expect("docs/operations.md");
    let (mut heading, mut out, mut block) = (String::new(), Vec::new(), None::<String>);
    for line in guide.lines() {
        match block.as_mut() {
            Some(b) if line.trim() == "```" => {
                out.push((heading.clone(), std::mem::take(b)));
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None if line.starts_with("### ") => heading = line[4..].trim().to_string(),
            None if line.trim() == "```sh procedure" => block = Some(String::new()),
            None => {}
        }
    }
    out
}

/// One `bash` reading the guide's commands from a pipe, in its own process group (the nodes it
/// starts in the background too), killed whole when dropped.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    transcript: Vec<String>,
    dir: PathBuf,
}

impl Shell {
    fn start(dir: &Path) -> Shell {
        let bin = Path::new(env!("CARGO_BIN_EXE_nearby-node"))
            .parent()
            .expect("the binaries' directory");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .env("PATH", path)
            .env_remove("NEARBY_HOME")
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = Shell {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            dir: dir.to_path_buf(),
        };
        // Errors into the transcript; the first failing command ends the shell (and the test).
        shell.send("exec 2>&1\nset -euo pipefail\n");
        shell
    }

    fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).expect("write to bash");
        self.stdin.flush().expect("flush");
    }

    /// Runs `script` and waits for it to finish within `within`; fails with the transcript and
    /// the nodes' logs if a command fails or time runs out.
    fn run(&mut self, name: &str, script: &str, within: Duration) {
        self.transcript.push(format!("$ # --- {name} ---"));
        self.send(script);
        self.send("\necho __DONE__\n");
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "__DONE__" => return,
                Ok(line) => {
                    eprintln!("guide | {line}");
                    self.transcript.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.fail(&format!("`{name}` took over {within:?}")),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("a command of `{name}` failed (the shell stopped)"))
                }
            }
        }
    }

    fn fail(&self, why: &str) -> ! {
        let mut logs = String::new();
        for n in 1..=5 {
            let path = self.dir.join(format!("nearby-ops/node{n}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                logs.push_str(&format!("\n--- node {n} (last lines) ---\n"));
                for l in tail.into_iter().rev() {
                    logs.push_str(l);
                    logs.push('\n');
                }
            }
        }
        panic!(
            "{why}\n--- transcript ---\n{}\n{logs}",
            self.transcript.join("\n")
        );
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // The shell leads its process group: a negative pid signals all of it (the nodes too).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// `nodectl ARGS`, which must be refused (exit 2): its reason.
fn nodectl_refused(ops: &Path, args: &[&str]) -> String {
    let out = super::nodectl(ops, args);
    let why = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "nodectl {args:?} was not refused: {why}"
    );
    why
}

/// A user of the run: their client, where they are, and their friend.
struct User {
    id: u64,
    friend: u64,
    at: Coord,
    client: Client,
}

/// What the users met while the procedures ran.
#[derive(Default)]
struct Seen {
    /// The procedure running (a node's failure counts as part of the one that replaces it).
    phase: String,
    /// Errors the users' calls got, by phase.
    errors: Vec<(String, String)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Signs the users in with tokens from the guide's token key, makes the pairs friends, and
/// keeps every user's location flowing once a second (errors are recorded, not fatal).
async fn users_online(ops: &Path, first: u64, seen: Arc<Mutex<Seen>>) -> Vec<Arc<User>> {
    let key = std::fs::read(ops.join("auth/token-key.pk8")).expect("token key");
    let signer = TokenSigner::from_pkcs8(&key).expect("token key");
    let ca = std::fs::read_to_string(ops.join("tls/cert.pem")).expect("client service cert");
    let mut users = Vec::new();
    for i in 0..USERS {
        let id = first + i;
        let friend = first + (i + USERS / 2) % USERS;
        let token = signer.sign(Claims {
            user: id,
            expires_at: Millis(now_ms() + 3_600_000),
        });
        let mut config = ClientConfig::new("127.0.1.1:7400", ca.clone(), id, token);
        config.endpoints = (1..=5).map(|n| format!("127.0.1.{n}:7400")).collect();
        let client = Client::connect(config).await.expect("connect");
        // Pairs stand 100 m apart, pairs 5 km from each other.
        let pair = i % (USERS / 2);
        let at = Coord {
            lat: 48.85 + pair as f64 * 0.045 + if i < USERS / 2 { 0.0 } else { 0.0009 },
            lon: 2.35,
        };
        drop(client.events());
        users.push(Arc::new(User {
            id,
            friend,
            at,
            client,
        }));
    }
    for u in &users {
        u.client.add_friend(u.friend).await.expect("add friend");
    }
    for u in &users {
        let (u, seen) = (Arc::clone(u), Arc::clone(&seen));
        tokio::spawn(async move {
            loop {
                if let Err(e) = u.client.update_location(u.at).await {
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    let phase = s.phase.clone();
                    s.errors.push((phase, format!("user {}: {e}", u.id)));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    users
}

/// Every user sees their friend nearby again within `within`.
async fn all_served(users: &[Arc<User>], within: Duration, after: &str) {
    let deadline = Instant::now() + within;
    for u in users {
        loop {
            let page = u.client.list_nearby(None, None).await;
            if page
                .as_ref()
                .is_ok_and(|p| p.friends.iter().any(|f| f.id == u.friend))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after `{after}`, user {} does not see friend {} within {within:?}: {page:?}",
                u.id,
                u.friend
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[test]
fn the_operations_guide_runs_as_written() {
    let blocks = procedures();
    let headings: Vec<&str> = blocks.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        headings, SECTIONS,
        "docs/operations.md's procedures changed: update this test with them"
    );
    let dir = tempfile::TempDir::new().expect("tmp");
    let ops = dir.path().join("nearby-ops");
    let mut shell = Shell::start(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut users = Vec::new();
    for (i, (heading, script)) in blocks.iter().enumerate() {
        seen.lock().unwrap_or_else(|p| p.into_inner()).phase = heading.clone();
        if heading == "Replace a failed node" {
            // The guide's failure: node 2's machine dies.
            let pid = std::fs::read_to_string(ops.join("node2.pid")).expect("node2.pid");
            let killed = Command::new("kill")
                .args(["-KILL", pid.trim()])
                .status()
                .expect("kill");
            assert!(killed.success(), "kill -KILL {pid}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !super::nodectl_json(&ops, &["status"])["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .any(|n| n["id"] == 2 && n["state"] == "down")
            {
                assert!(Instant::now() < deadline, "node 2 is not seen down");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        shell.run(heading, script, Duration::from_secs(400));
        if heading == "Add a node" {
            // Adding a member again, or an address where nothing waits, is refused with why.
            let why = nodectl_refused(&ops, &["add-node", "127.0.1.4:7401"]);
            assert!(why.contains("already node 4"), "{why}");
            let why = nodectl_refused(&ops, &["add-node", "127.0.1.9:7401", "--dry-run"]);
            assert!(why.contains("did not answer"), "{why}");
        }
        if i == 1 {
            // The cluster is up: users come online in group 3's range (which the guide splits).
            let groups = super::nodectl_json(&ops, &["groups"]);
            let g3 = groups["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .find(|g| g["id"] == 3)
                .expect("group 3");
            let first = g3["range"][0].as_u64().expect("range start") + 1;
            users = rt.block_on(users_online(&ops, first, Arc::clone(&seen)));
        }
        if !users.is_empty() {
            rt.block_on(all_served(&users, Duration::from_secs(30), heading));
        }
    }
    // The split happened where the guide says: group 3's users now live in two groups.
    let groups = super::nodectl_json(&ops, &["groups"]);
    let list = groups["groups"].as_array().expect("groups");
    assert_eq!(list.len(), 5, "four groups and the split's new one: {groups}");
    let states: Vec<(u64, String)> = super::nodectl_json(&ops, &["status"])["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap_or(0),
                n["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [(1, "up".into()), (3, "up".into()), (5, "up".into())],
        "nodes 2 and 4 are gone, the rest up"
    );
    // A planned step (adding, draining, splitting, restarting one node at a time) costs the
    // users no error at all; a node's sudden death may cost calls in flight to it.
    let errors = std::mem::take(&mut seen.lock().unwrap_or_else(|p| p.into_inner()).errors);
    for (phase, e) in &errors {
        eprintln!("  during `{phase}`: {e}");
    }
    // Load shedding (the node above 90 % of its cores, on a machine running five nodes, the
    // users and a build) refuses a periodic update with "send the next one as usual": not
    // something an operation did.
    let planned: Vec<&(String, String)> = errors
        .iter()
        .filter(|(p, e)| p != "Replace a failed node" && !e.contains("the node is overloaded"))
        .collect();
    assert!(
        planned.is_empty(),
        "users saw errors during planned steps: {planned:?}"
    );
    drop(users);
    drop(rt);
}
