//! A client on another QUIC stack: `tests/interop/aioquic_client.py` (Python, aioquic, written
//! from `docs/protocol.md` alone) signs in to a real `nearby-node dev`, asks a friend, sends a
//! location and waits for an event about the friend, while the friend — the `nearby` CLI, on
//! quinn — accepts and moves nearby every 300 ms. The Python interpreter is
//! `NEARBY_INTEROP_PYTHON` (`tests/run` points it at `target/interop-venv`, with aioquic
//! installed), else `python3`; without aioquic the test fails, it does not skip.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The Python client's user, and its friend (the CLI).
const PY_USER: u64 = 41;
const FRIEND: u64 = 42;
/// Where the Python client stands (Berlin), and where the friend starts: ~1.1 km north.
const PY_AT: (f64, f64) = (52.5200, 13.4050);
const FRIEND_AT: (f64, f64) = (52.5300, 13.4050);
/// The Python client's own limit for the whole run, and the test's (a little longer).
const PY_TIMEOUT_S: u64 = 60;
const DEADLINE: Duration = Duration::from_secs(90);

fn python() -> String {
    std::env::var("NEARBY_INTEROP_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/aioquic_client.py")
}

/// Fails (does not skip) unless `python` runs and imports aioquic.
fn require_aioquic(python: &str) {
    let out = Command::new(python)
        .args(["-c", "import aioquic; print(aioquic.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the interop client's Python {python:?} ({e}): run `tests/run` (it makes \
                 target/interop-venv with aioquic) or set NEARBY_INTEROP_PYTHON to a Python 3 \
                 with aioquic installed"
            )
        });
    assert!(
        out.status.success(),
        "aioquic is not importable by {python:?}: run `tests/run` (it makes target/interop-venv \
         with aioquic) or set NEARBY_INTEROP_PYTHON to a Python 3 with aioquic installed \
         (`pip install aioquic==1.7.2`)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node and the Python client, killed if the test fails half-way.
struct Procs {
    node: Option<(Child, mpsc::Receiver<String>)>,
    py: Option<Child>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        if let Some(py) = self.py.as_mut() {
            let _ = py.kill();
            let _ = py.wait();
        }
        if let Some((node, _)) = self.node.as_mut() {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// Reads all of a child's pipe on a thread.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

#[test]
fn an_aioquic_client_signs_in_and_sees_a_friend_move() {
    let python = python();
    require_aioquic(&python);
    let selftest = Command::new(&python)
        .arg(script())
        .arg("--self-test")
        .output()
        .expect("run the interop client's self-test");
    assert!(
        selftest.status.success(),
        "the interop client's codec disagrees with docs/protocol.md 4.1:\n{}{}",
        String::from_utf8_lossy(&selftest.stdout),
        String::from_utf8_lossy(&selftest.stderr)
    );

    let dir = tempfile::TempDir::new().expect("tmp");
    let home = dir.path().join("home");
    let mut procs = Procs {
        node: Some(super::start(dir.path())),
        py: None,
    };
    if let Some((_, rx)) = procs.node.as_ref() {
        super::wait_for(rx, "nearby dev node is ready");
    }
    // Both users exist before either asks the other (asking an unknown user is refused).
    for user in [PY_USER, FRIEND] {
        super::cli_result(&home, user, &["login"]).expect("login");
    }
    let endpoint = std::fs::read_to_string(home.join("endpoint")).expect("endpoint");
    let server_name = std::fs::read_to_string(home.join("server_name"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string());

    let mut py = Command::new(&python)
        .arg(script())
        .args(["--addr", endpoint.trim()])
        .arg("--ca")
        .arg(home.join("ca.pem"))
        .args(["--server-name", &server_name])
        .args(["--user", &PY_USER.to_string(), "--friend", &FRIEND.to_string()])
        .args(["--lat", &PY_AT.0.to_string(), "--lon", &PY_AT.1.to_string()])
        .args(["--timeout", &PY_TIMEOUT_S.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {python} {}: {e}", script().display()));
    let stdout = drain(py.stdout.take().expect("stdout"));
    let stderr = drain(py.stderr.take().expect("stderr"));
    procs.py = Some(py);

    // The friend (the CLI, on quinn) accepts, and moves within 2 km every 300 ms until the
    // Python client has seen an event about them and exited.
    let deadline = Instant::now() + DEADLINE;
    let (mut friends, mut moves, mut shed) = (false, 0_u32, 0_u32);
    let status = loop {
        let tick = Instant::now();
        if let Some(status) = procs.py.as_mut().and_then(|p| p.try_wait().expect("wait python")) {
            break status;
        }
        if Instant::now() >= deadline {
            if let Some(p) = procs.py.as_mut() {
                let _ = p.kill();
                let _ = p.wait();
            }
            panic!(
                "the aioquic client did not finish within {DEADLINE:?} (friends: {friends}, \
                 moves: {moves}, shed: {shed}); its log:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        if !friends {
            let added = super::cli_result(&home, FRIEND, &["friends", "add", &PY_USER.to_string()])
                .expect("friends add");
            friends = matches!(
                added["outcome"].as_str(),
                Some("friendship_formed" | "already_friends")
            );
        }
        let lat = FRIEND_AT.0 + 0.001 * f64::from(moves % 10);
        match super::cli_result(
            &home,
            FRIEND,
            &["location", "set", &format!("{lat:.4}"), &FRIEND_AT.1.to_string()],
        ) {
            Ok(_) => moves += 1,
            // A loaded node sheds periodic updates ("send the next one as usual").
            Err(code) if code == "rate_limited" => shed += 1,
            Err(code) => panic!("the friend's `location set` failed: {code}"),
        }
        std::thread::sleep(Duration::from_millis(300).saturating_sub(tick.elapsed()));
    };
    procs.py = None;
    let out = stdout.join().expect("stdout thread");
    let log = stderr.join().expect("stderr thread");
    assert!(
        status.success(),
        "the aioquic client failed ({status}): {out}\nits log:\n{log}"
    );
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("the aioquic client printed nothing; its log:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the aioquic client printed no JSON ({e}): {line}\n{log}"));
    assert_eq!(v["ok"], true, "{v}\n{log}");
    assert_eq!(v["friend"], FRIEND, "{v}\n{log}");
    assert!(
        matches!(v["event"].as_str(), Some("FriendEntered" | "FriendMoved")),
        "{v}\n{log}"
    );
    let d = v["distance_m"].as_f64().expect("distance_m");
    assert!(d > 0.0 && d <= 8_000.0, "distance {d} m: {v}");
    let lat = v["lat"].as_f64().expect("lat");
    let lon = v["lon"].as_f64().expect("lon");
    assert!(
        (FRIEND_AT.0 - 1e-9..=FRIEND_AT.0 + 0.0091).contains(&lat) && (lon - FRIEND_AT.1).abs() < 1e-9,
        "a position the friend never sent: {v}"
    );

    let (node, rx) = procs.node.take().expect("node");
    super::terminate(node, &rx);
}
