//! SDK tests against a real QUIC server written here ([`server`]), without the node crate:
//! handshake, request/response matching under concurrency, typed errors, redirects, reconnect
//! with resume, and moving on `Event::Shutdown`. Every wait has a deadline; nothing sleeps for
//! luck.

mod cli;
mod server;

use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{Coord, ErrorCode, Event, Outcome, Redirect, Request, Response};
use nearby_client::{Backoff, Client, ClientConfig, ClientError, LocationAck, SdkEvent};
use tokio::sync::mpsc;

use server::{first_page, Seen, TestServer, GOOD_TOKEN, HANG_RADIUS, UNKNOWN_USER};

const USER: u64 = 7;
const PARIS: Coord = Coord {
    lat: 48.8566,
    lon: 2.3522,
};

fn config(server: &TestServer) -> ClientConfig {
    let mut config = ClientConfig::new(server.endpoint(), server.ca_pem.clone(), USER, GOOD_TOKEN);
    config.reconnect = Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(200),
        max_attempts: Some(20),
    };
    config.connect_timeout = Duration::from_secs(2);
    config
}

/// The next event matching `pred`, skipping others; fails the test after 10 s.
async fn next_event(
    events: &mut mpsc::Receiver<SdkEvent>,
    what: &str,
    pred: impl Fn(&SdkEvent) -> bool,
) -> SdkEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

fn count(seen: &[Seen], pred: impl Fn(&Request) -> bool) -> usize {
    seen.iter().filter(|s| pred(&s.request)).count()
}

fn is_hello(r: &Request) -> bool {
    matches!(r, Request::Hello { .. })
}

fn is_paris(r: &Request) -> bool {
    matches!(r, Request::UpdateLocation { at } if *at == PARIS)
}

#[tokio::test]
async fn hello_then_typed_requests() {
    let server = TestServer::start(8000);
    let client = Client::connect(config(&server)).await.expect("connect");
    let session = client.session();
    assert_eq!((session.user, session.radius_m), (USER, 8000));

    // Before any location the node has no session to list.
    let err = client.list_nearby(None, None).await.expect_err("not started");
    assert_eq!(err.code(), Some(ErrorCode::NotStarted));

    let ack = client.update_location(PARIS).await.expect("location");
    assert_eq!(
        ack,
        LocationAck::Started {
            page: first_page(),
            next_update_s: 30
        }
    );
    let ack = client.update_location(PARIS).await.expect("location");
    assert_eq!(ack, LocationAck::Located { next_update_s: 30 });

    assert_eq!(
        client.add_friend(2).await.expect("add"),
        Outcome::FriendRequestSent
    );
    assert_eq!(
        client.remove_friend(2).await.expect("remove"),
        Outcome::FriendRemoved
    );
    assert_eq!(client.set_sharing(false).await.expect("share"), Outcome::Updated);
    assert_eq!(client.hide(2).await.expect("hide"), Outcome::Updated);
    assert_eq!(client.unhide(2).await.expect("unhide"), Outcome::Updated);
    assert_eq!(client.set_name("Ann").await.expect("name"), Outcome::Updated);
    assert_eq!(client.set_radius(500).await.expect("radius"), Outcome::Updated);
    assert!(client.list_friends().await.expect("friends").sharing);
    client.ping().await.expect("ping");

    let seen = server.seen();
    assert!(is_hello(&seen[0].request), "Hello first: {seen:?}");
    assert_eq!(count(&seen, is_hello), 1);
    client.close().await;
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn concurrent_requests_get_their_own_answers() {
    let server = TestServer::start(8000);
    let mut config = config(&server);
    config.max_in_flight = 8; // fewer slots than callers: callers wait, nothing is lost
    let client = Client::connect(config).await.expect("connect");
    client.update_location(PARIS).await.expect("location");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let cursor = format!("cursor-{i}");
            let page = client
                .list_nearby(Some(cursor.clone()), None)
                .await
                .expect("page");
            assert_eq!(page.next, Some(cursor));
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("in time")
            .expect("task");
    }
}

#[tokio::test]
async fn server_errors_surface_as_typed_errors() {
    let server = TestServer::start(8000);
    let client = Client::connect(config(&server)).await.expect("connect");

    let err = client.add_friend(UNKNOWN_USER).await.expect_err("unknown");
    match &err {
        ClientError::Server(body) => assert_eq!(body.code, ErrorCode::UnknownUser),
        other => panic!("expected a server error, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(err.kind_name(), "unknown_user");
    assert!(err.to_string().starts_with("unknown_user (9): "), "{err}");

    let err = client.set_name("").await.expect_err("empty name");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));

    // Bad coordinates never leave the client.
    let before = server.seen().len();
    for (lat, lon) in [(f64::NAN, 0.0), (91.0, 0.0), (0.0, -180.5)] {
        let err = client.update_location(Coord { lat, lon }).await.expect_err("bad");
        assert!(matches!(err, ClientError::InvalidCoordinates { .. }), "{err:?}");
    }
    assert_eq!(server.seen().len(), before);

    // A refused token fails the connect with the node's code.
    let mut bad = config(&server);
    bad.token = "forged".into();
    let err = Client::connect(bad).await.expect_err("bad token");
    assert_eq!(err.code(), Some(ErrorCode::TokenInvalid));
    assert!(err.needs_login());
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let server = TestServer::start(8000);
    let other = TestServer::start(8000);
    let mut config = config(&server);
    config.ca_pem = other.ca_pem.clone();
    let err = Client::connect(config).await.expect_err("untrusted");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");

    let mut config = self::config(&server);
    config.ca_pem = "garbage".into();
    let err = Client::connect(config).await.expect_err("no roots");
    assert!(matches!(err, ClientError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn dev_login_returns_a_token() {
    let server = TestServer::start(8000);
    let (token, expires_at) = Client::dev_login(&[server.endpoint()], "localhost", &server.ca_pem, 5)
        .await
        .expect("login");
    assert_eq!(token, "tok-5");
    assert!(expires_at.as_u64() > 0);
}

/// A server that redirects every `Hello` to `to`.
fn redirector(to: String) -> TestServer {
    TestServer::start_with(
        1,
        Some(Arc::new(move |r: &Request| {
            matches!(r, Request::Hello { .. }).then(|| {
                Response::Redirect(Redirect {
                    addr: to.clone(),
                    reason: "not the home shard".into(),
                })
            })
        })),
    )
}

#[tokio::test]
async fn redirect_is_followed() {
    let home = TestServer::start(4242);
    let front = redirector(home.endpoint());
    let mut config = config(&front);
    // Both test servers have their own self-signed certificate: trust both.
    config.ca_pem = format!("{}{}", front.ca_pem, home.ca_pem);
    let client = Client::connect(config).await.expect("connect via redirect");
    assert_eq!(client.session().radius_m, 4242);
    client.ping().await.expect("ping");
    assert_eq!(count(&home.seen(), is_hello), 1);
    assert_eq!(count(&home.seen(), |r| matches!(r, Request::Ping)), 1);
    assert_eq!(count(&front.seen(), |r| matches!(r, Request::Ping)), 0);
}

#[tokio::test]
async fn endless_redirects_are_bounded() {
    // A server redirecting to itself.
    let target = Arc::new(std::sync::Mutex::new(String::new()));
    let to = target.clone();
    let looper = TestServer::start_with(
        1,
        Some(Arc::new(move |r: &Request| {
            matches!(r, Request::Hello { .. }).then(|| {
                Response::Redirect(Redirect {
                    addr: to.lock().expect("target").clone(),
                    reason: "loop".into(),
                })
            })
        })),
    );
    *target.lock().expect("target") = looper.endpoint();
    let err = Client::connect(config(&looper)).await.expect_err("loop");
    assert!(matches!(err, ClientError::TooManyRedirects { .. }), "{err:?}");
    assert_eq!(
        count(&looper.seen(), is_hello),
        5,
        "the first try and four redirects"
    );
}

#[tokio::test]
async fn reconnects_with_backoff_and_resends_the_last_location() {
    let server = TestServer::start(8000);
    let client = Client::connect(config(&server)).await.expect("connect");
    let mut events = client.events().expect("events");
    assert!(client.events().is_none(), "one event stream per client");
    client.update_location(PARIS).await.expect("location");

    // Hold a request in flight, then kill the connection under it.
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.set_radius(HANG_RADIUS).await })
    };
    server
        .wait_until("the hanging request", |s| {
            count(
                s,
                |r| matches!(r, Request::SetRadius { meters } if *meters == HANG_RADIUS),
            ) == 1
        })
        .await;
    server.kill_connections();

    let err = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in time")
        .expect("task")
        .expect_err("the connection died under it");
    assert!(matches!(err, ClientError::ConnectionLost { .. }), "{err:?}");
    assert!(err.is_retryable());

    match next_event(&mut events, "reconnecting", |e| {
        matches!(e, SdkEvent::Reconnecting { .. })
    })
    .await
    {
        SdkEvent::Reconnecting { attempt, after, .. } => {
            assert_eq!(attempt, 1);
            assert!(after <= Duration::from_millis(20));
        }
        _ => unreachable!(),
    }
    match next_event(&mut events, "resumed", |e| matches!(e, SdkEvent::Resumed { .. })).await {
        SdkEvent::Resumed { page } => assert_eq!(page, Some(first_page())),
        _ => unreachable!(),
    }
    server
        .wait_until("Hello and the location, twice", |s| {
            count(s, is_hello) == 2 && count(s, is_paris) == 2
        })
        .await;
    let seen = server.seen();
    let second: Vec<_> = seen.iter().filter(|s| s.conn != seen[0].conn).collect();
    assert!(
        is_hello(&second[0].request) && is_paris(&second[1].request),
        "{second:?}"
    );

    // The resumed connection serves calls.
    client.ping().await.expect("ping after resume");
}

#[tokio::test]
async fn shutdown_with_redirect_moves_the_client() {
    let old = TestServer::start(1111);
    let new = TestServer::start(2222);
    let mut config = config(&old);
    config.ca_pem = format!("{}{}", old.ca_pem, new.ca_pem);
    let client = Client::connect(config).await.expect("connect");
    let mut events = client.events().expect("events");
    client.update_location(PARIS).await.expect("location");

    old.push(Event::Shutdown {
        reconnect_after_ms: 30,
        redirect: Some(new.endpoint()),
    })
    .await;
    let shutdown = next_event(&mut events, "the shutdown notice", |e| {
        matches!(e, SdkEvent::Event(Event::Shutdown { .. }))
    })
    .await;
    assert!(matches!(
        shutdown,
        SdkEvent::Event(Event::Shutdown {
            reconnect_after_ms: 30,
            ..
        })
    ));
    match next_event(&mut events, "reconnecting", |e| {
        matches!(e, SdkEvent::Reconnecting { .. })
    })
    .await
    {
        SdkEvent::Reconnecting { after, .. } => assert_eq!(after, Duration::from_millis(30)),
        _ => unreachable!(),
    }
    let resumed = next_event(&mut events, "resumed", |e| matches!(e, SdkEvent::Resumed { .. })).await;
    assert!(matches!(resumed, SdkEvent::Resumed { page: Some(_) }));
    assert_eq!(client.session().radius_m, 2222);
    new.wait_until("Hello and the location on the new node", |s| {
        count(s, is_hello) == 1 && count(s, is_paris) == 1
    })
    .await;
    client.ping().await.expect("ping");
    assert_eq!(count(&new.seen(), |r| matches!(r, Request::Ping)), 1);
    assert_eq!(count(&old.seen(), is_hello), 1);
}

#[tokio::test]
async fn events_are_delivered_in_order() {
    let server = TestServer::start(8000);
    let client = Client::connect(config(&server)).await.expect("connect");
    let mut events = client.events().expect("events");
    client.update_location(PARIS).await.expect("location");
    for n in 1..=20 {
        server.push(Event::Cadence { next_update_s: n }).await;
    }
    for n in 1..=20 {
        let e = next_event(&mut events, "a cadence", |e| matches!(e, SdkEvent::Event(_))).await;
        assert!(
            matches!(e, SdkEvent::Event(Event::Cadence { next_update_s }) if next_update_s == n),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn a_call_while_waiting_to_reconnect_brings_the_next_attempt_forward() {
    let server = TestServer::start(8000);
    let mut config = config(&server);
    // A backoff grown long: left alone, the client would wait 30–60 s before its next attempt.
    config.reconnect = Backoff {
        base: Duration::from_secs(60),
        max: Duration::from_secs(60),
        max_attempts: None,
    };
    let client = Client::connect(config).await.expect("connect");
    let mut events = client.events().expect("events");
    server.kill_connections();
    match next_event(&mut events, "reconnecting", |e| {
        matches!(e, SdkEvent::Reconnecting { .. })
    })
    .await
    {
        SdkEvent::Reconnecting { after, .. } => assert!(after >= Duration::from_secs(30), "{after:?}"),
        _ => unreachable!(),
    }
    // The app calls: answered at once (the client is between connections), and the next
    // attempt comes EARLY_ATTEMPT_AFTER after the wait began, well within next_event's 10 s.
    let called = client.ping().await;
    assert!(matches!(called, Err(ClientError::Reconnecting)), "{called:?}");
    next_event(&mut events, "resumed", |e| matches!(e, SdkEvent::Resumed { .. })).await;
    client.ping().await.expect("served again");
}

#[tokio::test]
async fn gives_up_after_the_configured_attempts() {
    let server = TestServer::start(8000);
    let mut config = config(&server);
    config.reconnect.max_attempts = Some(2);
    config.connect_timeout = Duration::from_millis(300);
    let client = Client::connect(config).await.expect("connect");
    let mut events = client.events().expect("events");
    server.stop();
    let closed = next_event(&mut events, "closed", |e| matches!(e, SdkEvent::Closed(_))).await;
    let SdkEvent::Closed(reason) = closed else {
        unreachable!()
    };
    assert!(reason.is_retryable(), "the last failure is reported: {reason:?}");
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
}

#[path = "../../benches/examples.rs"]
mod examples;

/// The byte-level examples in `docs/protocol.md` are what the codec produces, and are printed.
#[test]
fn protocol_doc_examples_match_the_codec() {
    examples::check_documented_examples();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md");
    // The doc prints bytes inline (`00 00 00 02 01 0b`) or as dumps whose lines start with
    // bytes and end with a comment: collect the bytes in order, a `|` between separate spans.
    let is_byte = |t: &str| t.len() == 2 && t.chars().all(|c| c.is_ascii_hexdigit());
    let mut seen: Vec<String> = Vec::new();
    for line in doc.lines() {
        if line.contains('`') {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    seen.push("|".into());
                    seen.extend(span.split_whitespace().filter(|t| is_byte(t)).map(String::from));
                }
            }
            seen.push("|".into());
        } else {
            let lead: Vec<String> = line
                .split_whitespace()
                .take_while(|t| is_byte(t))
                .map(String::from)
                .collect();
            if lead.is_empty() {
                seen.push("|".into());
            }
            seen.extend(lead);
        }
    }
    let printed = seen.join(" ");
    for (name, hex) in examples::DOCUMENTED {
        let hex = hex.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            printed.contains(&hex),
            "docs/protocol.md does not print the {name} example: {hex}"
        );
    }
}

#[tokio::test]
async fn a_resumed_session_listens_to_strangers_again() {
    let server = TestServer::start(8001);
    let client = Client::connect(config(&server)).await.expect("connect");
    let mut events = client.events().expect("events");
    client.update_location(PARIS).await.expect("location");
    client.list_strangers(Some(5)).await.expect("strangers");
    server.kill_connections();
    next_event(&mut events, "resumed", |e| matches!(e, SdkEvent::Resumed { .. })).await;
    server
        .wait_until("ListStrangers again on the new connection", |s| {
            count(s, |r| matches!(r, Request::ListStrangers { page_size: Some(5) })) == 2
        })
        .await;
    let seen = server.seen();
    let second: Vec<_> = seen.iter().filter(|s| s.conn != seen[0].conn).collect();
    assert!(
        matches!(
            second.last().map(|s| &s.request),
            Some(Request::ListStrangers { .. })
        ),
        "{second:?}"
    );
}
