//! The `nearby` binary end to end against the test server: NEARBY_HOME files, `login` storing a
//! token, JSON output, and errors (stderr line, JSON on stdout, non-zero exit).

use std::path::Path;

use serde_json::Value;

use crate::server::TestServer;

/// Runs `nearby` with `home` as NEARBY_HOME; returns (exit code, stdout, stderr).
async fn nearby(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nearby"))
        .args(args)
        .env("NEARBY_HOME", home)
        .env_remove("NEARBY_USER")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run nearby");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout:?}"))
}

#[tokio::test]
async fn login_then_commands_with_json_output() {
    let server = TestServer::start(8000);
    let home = tempfile::tempdir().expect("tmp");
    std::fs::write(home.path().join("endpoint"), format!("{}\n", server.endpoint())).expect("write");
    std::fs::write(home.path().join("ca.pem"), &server.ca_pem).expect("write");

    // No token yet: a setup error that says what to do.
    let (code, stdout, stderr) = nearby(home.path(), &["--user", "7", "--json", "ping"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("nearby login --user 7"), "{stderr}");
    assert_eq!(json(&stdout)["error"]["code"], "setup");

    let (code, stdout, stderr) = nearby(home.path(), &["--user", "7", "--json", "login"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&stdout)["ok"], true);
    let token = std::fs::read_to_string(home.path().join("tokens/7")).expect("token file");
    assert_eq!(token.trim(), "tok-7");
    // The test server only accepts its own token; store it as a login would have.
    std::fs::write(home.path().join("tokens/7"), crate::server::GOOD_TOKEN).expect("write");

    let (code, stdout, stderr) = nearby(
        home.path(),
        &["--user", "7", "--json", "location", "set", "-33.86", "151.2"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let v = json(&stdout);
    assert_eq!(v["ok"], true);
    assert_eq!(v["friends"][0]["id"], 2);
    assert_eq!(v["friends"][0]["updated_at"], "2023-11-14T22:13:20.000Z");

    let (code, stdout, _) = nearby(home.path(), &["--user", "7", "--json", "friends", "add", "5"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        json(&stdout),
        serde_json::json!({"ok": true, "outcome": "friend_request_sent"})
    );

    let (code, stdout, stderr) =
        nearby(home.path(), &["--user", "7", "--json", "friends", "add", "999"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: unknown_user (9): no such user"),
        "{stderr}"
    );
    assert_eq!(
        json(&stdout),
        serde_json::json!({"error": {"code": "unknown_user", "message": "no such user"}})
    );

    // Each CLI run is a new connection: the test server needs a location on it before `list`.
    let (code, _, stderr) = nearby(home.path(), &["--user", "7", "list"]).await;
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error: not_started (14): "), "{stderr}");

    let (code, stdout, _) = nearby(home.path(), &["--user", "7", "share", "off"]).await;
    assert_eq!((code, stdout.trim()), (0, "done"));
}
