//! The product beyond friends, over QUIC on one node: followers (one-way sharing) and ghost
//! mode with a timer that ends by itself.

use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{ErrorCode, Event, GhostMode, GoneReason, Relation, GHOST_FOREVER};
use nearby_client::{ClientError, Millis};
use nearby_node::api::Backend;

use crate::util::{uid, until_ok, TestNode, Viewer};

const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server(body) => body.code,
        other => panic!("expected a node error, got {other}"),
    }
}

/// Moves `probe` and waits for `viewer`'s event about it: every event about anyone else that
/// was sent before would have arrived first (one session's events are ordered).
async fn nothing_before_probe(viewer: &mut Viewer, probe: &Viewer, lon: f64) {
    probe.at(B.0, lon).await;
    viewer.next_about(probe.user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_the_followed_who_does_not_see_back_and_revoking_stops_it_at_once() {
    let node = TestNode::start().await;
    let (ann, bob, pa, pb) = (uid(0, 40), uid(3, 40), uid(1, 40), uid(2, 40));
    for u in [ann, bob] {
        node.core.ensure_registered(u).await.expect("register");
    }
    // A probe friend each, to show that nothing else came first.
    node.befriend(ann, pa).await;
    node.befriend(bob, pb).await;
    let mut a = node.client(ann).await;
    let mut b = node.client(bob).await;
    let (pa, pb) = (node.client(pa).await, node.client(pb).await);
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    pa.at(B.0, B.1 + 0.01).await;
    pb.at(B.0, B.1 + 0.02).await;
    a.next_about(pa.user).await;
    b.next_about(pb.user).await;

    // ann lets bob follow: bob sees ann at once, ann sees nothing of bob.
    a.client.allow_follower(bob).await.expect("allow");
    assert!(matches!(b.next_about(ann).await, Event::FriendEntered(_)));
    let page = b.client.list_nearby(None, None).await.expect("list");
    let entry = page.friends.iter().find(|f| f.id == ann).expect("ann listed");
    assert_eq!(entry.relation, Relation::Following);
    a.at(A.0 + 0.001, A.1).await;
    assert!(matches!(b.next_about(ann).await, Event::FriendMoved(_)));
    b.at(B.0 + 0.001, B.1).await;
    nothing_before_probe(&mut a, &pa, B.1 + 0.011).await;
    let ann_sees = a.client.list_nearby(None, None).await.expect("list");
    assert!(ann_sees.friends.iter().all(|f| f.id != bob), "{ann_sees:?}");
    // Both lists say who follows whom.
    let rel = |list: &nearby_client::proto::FriendList, id| {
        list.entries
            .iter()
            .filter(|e| e.id == id)
            .map(|e| e.relation)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rel(&a.client.list_friends().await.expect("list"), bob),
        vec![Relation::Follower]
    );
    assert_eq!(
        rel(&b.client.list_friends().await.expect("list"), ann),
        vec![Relation::Following]
    );

    // Revoked: gone at once; ann's moves no longer reach bob.
    a.client.revoke_follower(bob).await.expect("revoke");
    assert!(matches!(
        b.next_about(ann).await,
        Event::FriendGone {
            reason: GoneReason::Unfriended,
            ..
        }
    ));
    a.at(A.0 + 0.002, A.1).await;
    nothing_before_probe(&mut b, &pb, B.1 + 0.021).await;

    // Allowed again; this time bob stops following by himself.
    a.client.allow_follower(bob).await.expect("allow");
    assert!(matches!(b.next_about(ann).await, Event::FriendEntered(_)));
    b.client.unfollow(ann).await.expect("unfollow");
    assert!(matches!(b.next_about(ann).await, Event::FriendGone { .. }));
    a.at(A.0 + 0.003, A.1).await;
    nothing_before_probe(&mut b, &pb, B.1 + 0.022).await;
    assert!(rel(&a.client.list_friends().await.expect("list"), bob).is_empty());

    // Bad input changes nothing.
    assert_eq!(
        code(a.client.allow_follower(ann).await.expect_err("self")),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(a.client.allow_follower(uid(2, 999)).await.expect_err("unknown")),
        ErrorCode::UnknownUser
    );
    assert_eq!(
        code(a.client.allow_follower(0).await.expect_err("zero")),
        ErrorCode::InvalidArgument
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_mode_hides_at_once_and_a_timed_one_ends_by_itself() {
    let node = TestNode::start().await;
    let (ann, bob, probe) = (uid(0, 41), uid(3, 41), uid(1, 41));
    node.befriend(ann, bob).await;
    node.befriend(ann, probe).await;
    let mut a = node.client(ann).await;
    let b = node.client(bob).await;
    let p = node.client(probe).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    p.at(B.0, B.1 + 0.01).await;
    a.next_about(bob).await;
    a.next_about(probe).await;

    // For a minute: hidden at once, moves not sent.
    let before = node.core.now();
    let until = b
        .client
        .set_ghost(GhostMode::For { seconds: 60 })
        .await
        .expect("ghost");
    let until = until.expect("ghost on");
    assert_eq!(until.0, before.0 + 60_000, "the node's clock did not move");
    assert!(matches!(
        a.next_about(bob).await,
        Event::FriendGone {
            reason: GoneReason::Hidden,
            ..
        }
    ));
    assert_eq!(
        b.client.list_friends().await.expect("list").ghost_until,
        Some(until)
    );
    b.at(B.0 + 0.001, B.1).await;
    nothing_before_probe(&mut a, &p, B.1 + 0.011).await;
    // Still hidden just before the end.
    node.clock.advance(Duration::from_secs(59));
    b.at(B.0 + 0.002, B.1).await;
    nothing_before_probe(&mut a, &p, B.1 + 0.012).await;
    // The minute is up: bob is back without anyone acting (bob does not move).
    node.clock.advance(Duration::from_secs(2));
    match a.next_about(bob).await {
        Event::FriendEntered(pos) => assert!((pos.at.lat - (B.0 + 0.002)).abs() < 1e-9, "{pos:?}"),
        e => panic!("expected bob back, got {e:?}"),
    }
    assert_eq!(b.client.list_friends().await.expect("list").ghost_until, None);

    // Until turned off.
    assert_eq!(
        b.client.set_ghost(GhostMode::On).await.expect("ghost"),
        Some(GHOST_FOREVER)
    );
    assert!(matches!(a.next_about(bob).await, Event::FriendGone { .. }));
    node.clock.advance(Duration::from_secs(300));
    b.at(B.0 + 0.003, B.1).await;
    nothing_before_probe(&mut a, &p, B.1 + 0.013).await;
    assert_eq!(b.client.set_ghost(GhostMode::Off).await.expect("off"), None);
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));
    // A timed one turned off before its end.
    b.client
        .set_ghost(GhostMode::For { seconds: 5_400 })
        .await
        .expect("ghost");
    assert!(matches!(a.next_about(bob).await, Event::FriendGone { .. }));
    assert_eq!(b.client.set_ghost(GhostMode::Off).await.expect("off"), None);
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));

    // Durations out of range are refused and change nothing.
    for seconds in [0, nearby_client::proto::MAX_GHOST_S + 1] {
        let e = b
            .client
            .set_ghost(GhostMode::For { seconds })
            .await
            .expect_err("refused");
        assert_eq!(code(e), ErrorCode::InvalidArgument);
    }
    assert_eq!(b.client.list_friends().await.expect("list").ghost_until, None);
    node.stop().await;
}

/// Two points 600 m apart in Berlin on either side of an H3 cell border (the resolution
/// strangers' channels use), west first.
fn across_a_cell_border() -> ((f64, f64), (f64, f64)) {
    use nearby_index::cells::CellIndexer;
    use nearby_index::geo::LatLng;
    let cells = CellIndexer::default();
    let cell = |lon: f64| cells.cell_of(LatLng::new(A.0, lon).expect("ll"));
    let mut lon = A.1;
    let start = cell(lon);
    while cell(lon) == start {
        lon += 0.000_1;
    }
    // ~68 m per 0.001° of longitude at this latitude: 300 m either side of the border.
    let (west, east) = ((A.0, lon - 0.004_4), (A.0, lon + 0.004_4));
    assert_ne!(cell(west.1), cell(east.1), "not across a border");
    (west, east)
}

/// Asserts that nothing in `bytes` (an encoded message the viewer received) names `user`.
fn names_nobody(bytes: &[u8], user: u64) {
    let id = user.to_le_bytes();
    assert!(
        !bytes.windows(8).any(|w| w == id),
        "user {user}'s id reached a viewer: {bytes:02x?}"
    );
}

async fn strangers(v: &Viewer) -> nearby_client::proto::StrangerPage {
    v.client.list_strangers(None).await.expect("strangers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_across_a_cell_border_are_seen_under_pseudonyms_and_never_with_ids_or_fine_distances() {
    use nearby_client::proto::{frame, Response, StrangerPage};
    let node = TestNode::start().await;
    let (west, east) = across_a_cell_border();
    // vic and val look; sam is discoverable; fay is vic's friend and discoverable; ned is not
    // discoverable; gus is discoverable but a ghost.
    let (vic, val, sam, fay, ned, gus) = (
        uid(0, 50),
        uid(1, 50),
        uid(2, 50),
        uid(3, 50),
        uid(0, 51),
        uid(1, 51),
    );
    node.befriend(vic, fay).await;
    for u in [val, sam, ned, gus] {
        node.core.ensure_registered(u).await.expect("register");
    }
    let mut v1 = node.client(vic).await;
    let v2 = node.client(val).await;
    let s = node.client(sam).await;
    let f = node.client(fay).await;
    let n = node.client(ned).await;
    let g = node.client(gus).await;
    for who in [&s, &f, &g] {
        who.client.set_discoverable(true).await.expect("discoverable");
    }
    g.client.set_ghost(GhostMode::On).await.expect("ghost");
    v1.at(west.0, west.1).await;
    v2.at(west.0, west.1 - 0.001).await;
    s.at(east.0, east.1).await;
    f.at(east.0, east.1 + 0.000_5).await;
    n.at(east.0, east.1 + 0.001).await;
    g.at(east.0, east.1 + 0.001_5).await;

    // vic sees sam, across the border, and not his friend fay (shown as a friend instead), nor
    // ned (not discoverable) nor gus (a ghost).
    let page = strangers(&v1).await;
    assert_eq!(page.strangers.len(), 1, "{page:?}");
    assert_eq!(page.more, 0);
    let seen = &page.strangers[0];
    assert_eq!(seen.name, format!("user {sam}"));
    // 600 m apart: rounded up to 1,000 m, never finer.
    assert_eq!(seen.distance_m, 1_000, "{seen:?}");
    // val sees sam and fay, under pseudonyms of her own.
    let page2 = strangers(&v2).await;
    assert_eq!(page2.strangers.len(), 2, "{page2:?}");
    let sam_for_val = page2
        .strangers
        .iter()
        .find(|x| x.name == format!("user {sam}"))
        .expect("sam");
    assert_ne!(
        sam_for_val.pseudonym, seen.pseudonym,
        "two viewers got one pseudonym"
    );
    // The pseudonym is stable: asked again, the same.
    assert_eq!(strangers(&v1).await.strangers[0].pseudonym, seen.pseudonym);

    // Live: sam moves and vic is told; then sam stops being discoverable: gone at once.
    s.at(east.0, east.1 + 0.000_1).await;
    let mut received: Vec<Vec<u8>> = Vec::new();
    let wait_for = |want: &'static str| {
        move |e: &Event| match e {
            Event::StrangerNearby(_) => want == "nearby",
            Event::StrangerGone { .. } => want == "gone",
            _ => false,
        }
    };
    let moved = loop {
        let e = v1.next().await;
        received.push(frame::to_bytes(&e).expect("encode"));
        if wait_for("nearby")(&e) {
            break e;
        }
    };
    assert!(matches!(&moved, Event::StrangerNearby(x) if x.pseudonym == seen.pseudonym));
    s.client.set_discoverable(false).await.expect("off");
    let gone = loop {
        let e = v1.next().await;
        received.push(frame::to_bytes(&e).expect("encode"));
        if wait_for("gone")(&e) {
            break e;
        }
    };
    assert_eq!(
        gone,
        Event::StrangerGone {
            pseudonym: seen.pseudonym.clone()
        }
    );
    assert!(strangers(&v1).await.strangers.is_empty());
    // Discoverable again: a position stamped within the clock margin of the withdrawal (two
    // nodes' clocks may be that far apart) could be one published before it, so it is
    // refused; the next one, stamped later, shows sam again. Then a ghost: gone again.
    s.client.set_discoverable(true).await.expect("on");
    s.at(east.0, east.1).await;
    assert!(strangers(&v1).await.strangers.is_empty());
    node.clock.advance(Duration::from_millis(1_500));
    s.at(east.0, east.1 + 0.000_1).await;
    assert_eq!(strangers(&v1).await.strangers.len(), 1);
    s.client
        .set_ghost(GhostMode::For { seconds: 600 })
        .await
        .expect("ghost");
    assert!(strangers(&v1).await.strangers.is_empty());

    // Every byte that reached the viewers: no id of anyone they only know as a stranger (fay
    // is vic's friend: her events name her), distances on the 500 m grid.
    for bytes in &received {
        for who in [sam, ned, gus] {
            names_nobody(bytes, who);
        }
    }
    let pages: Vec<StrangerPage> = vec![page, page2, strangers(&v1).await, strangers(&v2).await];
    for p in &pages {
        let bytes = frame::to_bytes(&Response::Strangers(p.clone())).expect("encode");
        for who in [sam, fay, ned, gus] {
            names_nobody(&bytes, who);
        }
        assert!(p.strangers.iter().all(|x| x.distance_m % 500 == 0), "{p:?}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowded_cell_gives_the_nearest_page_and_a_count_and_inactive_strangers_go() {
    let node = TestNode::start().await;
    let viewer = uid(0, 60);
    node.core.ensure_registered(viewer).await.expect("register");
    let v = node.client(viewer).await;
    v.at(A.0, A.1).await;
    // 30 strangers in a stadium 1–4 km north, spread over the groups.
    let mut crowd = Vec::new();
    for i in 0..30u64 {
        let user = uid((i % 4) as usize, 100 + i);
        node.core.ensure_registered(user).await.expect("register");
        let c = node.client(user).await;
        c.client.set_discoverable(true).await.expect("discoverable");
        c.at(A.0 + 0.01 + 0.001 * i as f64, A.1).await;
        crowd.push(c);
    }
    let page = v.client.list_strangers(Some(5)).await.expect("page");
    assert_eq!(page.strangers.len(), 5);
    assert_eq!(page.more, 25);
    let d: Vec<u32> = page.strangers.iter().map(|s| s.distance_m).collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "not nearest first: {d:?}");
    assert_eq!(page.strangers[0].name, format!("user {}", uid(0, 100)));

    // Ten minutes without an update: everyone but the viewer (who keeps updating) goes.
    node.clock.advance(Duration::from_secs(9 * 60));
    v.at(A.0, A.1).await;
    node.clock.advance(Duration::from_secs(61));
    v.at(A.0, A.1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = v.client.list_strangers(Some(5)).await.expect("page");
        if page.strangers.is_empty() && page.more == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "inactive strangers still listed: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

/// Polls `user`'s whole history until it has `n` points (batches are written within 100 ms).
async fn history_of(v: &Viewer, n: usize) -> Vec<nearby_client::proto::HistoryPoint> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = v.client.read_history(None, None, None).await.expect("history");
        assert!(page.complete, "{page:?}");
        if page.points.len() >= n {
            assert_eq!(page.points.len(), n, "{page:?}");
            return page.points;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} points: {page:?}",
            page.points.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_recorded_read_by_range_turned_off_and_really_deleted_from_disk() {
    let node = TestNode::start().await;
    // Ids whose 8 bytes cannot turn up in a file by chance.
    let (ann, bob) = (uid(1, 70), uid(2, 70));
    for u in [ann, bob] {
        node.core.ensure_registered(u).await.expect("register");
    }
    let a = node.client(ann).await;
    let b = node.client(bob).await;
    let t0 = node.core.now();
    for i in 0..4 {
        a.at(A.0 + 0.001 * f64::from(i), A.1).await;
        b.at(B.0, B.1 + 0.001 * f64::from(i)).await;
        node.clock.advance(Duration::from_secs(60));
    }
    let points = history_of(&a, 4).await;
    assert_eq!(points[0].recorded_at, t0);
    assert!((points[3].at.lat - (A.0 + 0.003)).abs() < 1e-9, "{points:?}");
    assert!(points.windows(2).all(|w| w[0].recorded_at < w[1].recorded_at));
    // By range: [t0 + 1 min, t0 + 3 min) holds the 2nd and 3rd.
    let minute = |m: u64| Millis(t0.0 + m * 60_000);
    let range = a
        .client
        .read_history(Some(minute(1)), Some(minute(3)), None)
        .await
        .expect("range");
    let times: Vec<Millis> = range.points.iter().map(|p| p.recorded_at).collect();
    assert_eq!(times, vec![minute(1), minute(2)]);
    let first = a.client.read_history(None, None, Some(1)).await.expect("limit");
    assert_eq!((first.points.len(), first.more), (1, true));

    // Off: nothing recorded; the setting shows; on again: recorded again.
    assert!(a.client.list_friends().await.expect("list").history);
    a.client.set_history(false).await.expect("off");
    assert!(!a.client.list_friends().await.expect("list").history);
    a.at(A.0 + 0.01, A.1).await;
    node.clock.advance(Duration::from_secs(60));
    a.client.set_history(true).await.expect("on");
    a.at(A.0 + 0.02, A.1).await;
    let points = history_of(&a, 5).await;
    assert!(
        (points[4].at.lat - (A.0 + 0.02)).abs() < 1e-9,
        "an update made while off was recorded: {points:?}"
    );

    // Deleted: gone from reads and from every byte on disk; bob's history stays.
    b.client.read_history(None, None, None).await.expect("bob");
    a.client.delete_history().await.expect("delete");
    let page = a.client.read_history(None, None, None).await.expect("history");
    assert!(page.points.is_empty(), "{page:?}");
    let ann_id = ann.to_le_bytes();
    let bob_id = bob.to_le_bytes();
    let files = all_bytes(&node.data().join("history"));
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        assert!(
            !bytes.windows(8).any(|w| w == ann_id),
            "{} still holds bytes of ann's history",
            path.display()
        );
    }
    assert!(
        files
            .iter()
            .any(|(_, bytes)| bytes.windows(8).any(|w| w == bob_id)),
        "bob's history is gone too"
    );
    assert_eq!(history_of(&b, 4).await.len(), 4);
    // What comes after the deletion is recorded again.
    node.clock.advance(Duration::from_secs(1));
    a.at(A.0, A.1 + 0.05).await;
    assert_eq!(history_of(&a, 1).await.len(), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_faster_than_the_interval_and_sessions_beyond_the_limit_are_refused() {
    let service = nearby_node::api::ServiceConfig {
        shed: None,
        sessions_per_user: 2,
        ..nearby_node::api::ServiceConfig::default()
    };
    let node = TestNode::start_limited(None, service, Duration::from_secs(3_600)).await;
    let (ann, bob) = (uid(0, 80), uid(1, 80));
    node.befriend(ann, bob).await;
    let mut b = node.client(bob).await;
    let a = node.client(ann).await;
    b.at(B.0, B.1).await;
    a.at(A.0, A.1).await;
    assert!(matches!(b.next_about(ann).await, Event::FriendEntered(_)));
    // The pace counts from the update after the session's start (a resumed session's first
    // location may be followed at once by the app's next): that one goes through, one right
    // after it is refused, and nothing of the refused one reaches bob.
    a.client
        .update_location(nearby_client::proto::Coord { lat: A.0, lon: A.1 })
        .await
        .expect("the update right after the start");
    let e = a
        .client
        .update_location(nearby_client::proto::Coord {
            lat: A.0 + 0.001,
            lon: A.1,
        })
        .await
        .expect_err("too fast");
    assert_eq!(code(e), ErrorCode::RateLimited);
    let page = b.client.list_nearby(None, None).await.expect("list");
    assert!(
        (page.friends[0].distance_m - 3_002.3).abs() < 30.0,
        "the refused update moved ann: {page:?}"
    );
    // A third session of ann: refused; the first two keep working.
    let second = node.client(ann).await;
    let cfg = nearby_client::ClientConfig::new(node.addr.clone(), node.ca_pem.clone(), ann, node.token(ann));
    let third = nearby_client::Client::connect(cfg)
        .await
        .expect_err("a third session");
    assert_eq!(code(third), ErrorCode::TooManySessions);
    second
        .client
        .ping()
        .await
        .expect("the second session still works");
    a.client.ping().await.expect("the first session still works");
    node.stop().await;
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_bounded_memory_while_others_keep_their_latency() {
    // The process's memory is measured: no other test's node may run beside.
    let node = TestNode::start_alone().await;
    let (slow, carl) = (uid(0, 90), uid(1, 90));
    // 30 friends of the slow reader cross the edge of its radius again and again ("entered" and
    // "left" may not be dropped); the first of them is also carl's friend.
    let movers: Vec<u64> = (0..30).map(|i| uid((i % 4) as usize, 100 + i)).collect();
    for &m in &movers {
        node.befriend(slow, m).await;
    }
    node.befriend(carl, movers[0]).await;
    // The slow reader: its app never takes events, so the SDK stops reading the event stream.
    let mut cfg =
        nearby_client::ClientConfig::new(node.addr.clone(), node.ca_pem.clone(), slow, node.token(slow));
    cfg.event_capacity = 1;
    let s = nearby_client::Client::connect(cfg).await.expect("connect");
    s.update_location(nearby_client::proto::Coord { lat: A.0, lon: A.1 })
        .await
        .expect("located");
    let mut c = node.client(carl).await;
    c.at(A.0, A.1 + 0.01).await;
    let mut clients = Vec::new();
    for &m in &movers {
        let v = node.client(m).await;
        v.at(A.0 + 0.01, A.1).await;
        clients.push(v);
    }
    assert!(matches!(c.next_about(movers[0]).await, Event::FriendEntered(_)));

    let before = rss();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (inside, outside) = ((A.0 + 0.07, A.1), (A.0 + 0.08, A.1)); // 7.8 km, 8.9 km from the reader
    let mut worst = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0u64;
    while s.link_stats().connections < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow reader was never closed"
        );
        let at = if round.is_multiple_of(2) { outside } else { inside };
        let sent = std::time::Instant::now();
        futures::future::join_all(clients.iter().map(|v| v.at(at.0, at.1))).await;
        // carl reads and keeps up: each crossing of his friend reaches him promptly.
        let e = c.next_about(movers[0]).await;
        assert!(
            matches!(e, Event::FriendLeft { .. } | Event::FriendEntered(_)),
            "{e:?}"
        );
        worst = worst.max(sent.elapsed());
        round += 1;
        // Each mover stays within its session's 20 requests/s.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    sampler.abort();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    tracing::info!(rounds = round, grew, ?worst, "slow reader closed");
    assert!(
        grew < 64 << 20,
        "memory grew by {} MiB while a reader stalled",
        grew >> 20
    );
    assert!(
        worst < Duration::from_secs(1),
        "a reading session waited {worst:?} for an event"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_friend_list_comes_in_pages_that_always_fit_a_frame() {
    let node = TestNode::start().await;
    let ann = uid(0, 200);
    node.core.ensure_registered(ann).await.expect("register");
    // 150 friends with the longest names there are: 64 characters of 4 bytes each.
    let friends: Vec<u64> = (0..150).map(|i| uid((i % 4) as usize, 300 + i)).collect();
    for &f in &friends {
        node.befriend(ann, f).await;
        node.core
            .commit(nearby_raft::Command::SetName {
                user: f,
                name: "🦀".repeat(64),
            })
            .await
            .expect("name");
    }
    // One follower too: a friend who is also a follower has two entries.
    node.core
        .commit(nearby_raft::Command::GrantFollow {
            user: ann,
            follower: friends[0],
        })
        .await
        .expect("grant");
    let a = node.client(ann).await;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = a.client.list_friends_page(after, None).await.expect("page");
        let ids: std::collections::BTreeSet<u64> = page.entries.iter().map(|e| e.id).collect();
        assert!(ids.len() <= usize::from(nearby_client::proto::MAX_FRIENDS_PAGE));
        seen.extend(ids);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut want = friends.clone();
    want.sort_unstable();
    assert_eq!(seen, want, "every friend exactly once, in order");
    let all = a.client.list_friends().await.expect("all");
    assert_eq!(all.entries.len(), 151);
    assert_eq!(
        all.entries
            .iter()
            .filter(|e| e.id == friends[0])
            .map(|e| e.relation)
            .collect::<Vec<_>>(),
        vec![Relation::Friend, Relation::Follower]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_asked_to_renew_its_token_and_closed_when_it_does_not() {
    use nearby_client::SdkEvent;
    use nearby_node::auth::Claims;
    let node = TestNode::start().await;
    let (ann, bob) = (uid(0, 95), uid(1, 95));
    for u in [ann, bob] {
        node.core.ensure_registered(u).await.expect("register");
    }
    let short = |user, ms: u64| {
        node.signer.sign(Claims {
            user,
            expires_at: Millis(node.core.now().0 + ms),
        })
    };
    let connect = |user, token: String| {
        let cfg = nearby_client::ClientConfig::new(node.addr.clone(), node.ca_pem.clone(), user, token);
        nearby_client::Client::connect(cfg)
    };
    // Both tokens expire in 1.5 s (less than the renewal lead): asked to renew at once.
    let a = connect(ann, short(ann, 1_500)).await.expect("ann");
    let b = connect(bob, short(bob, 1_500)).await.expect("bob");
    let mut a_events = a.events().expect("events");
    let mut b_events = b.events().expect("events");
    for events in [&mut a_events, &mut b_events] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(SdkEvent::Event(Event::TokenExpiring { .. }))) => break,
                Ok(Some(_)) => {}
                other => panic!("no renewal request: {other:?}"),
            }
        }
    }
    // ann renews; bob does not, and the node's clock passes his token's end.
    a.renew(node.token(ann)).await.expect("renew");
    node.clock.advance(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let why = loop {
        match tokio::time::timeout_at(deadline, b_events.recv()).await {
            Ok(Some(SdkEvent::Closed(why))) => break why,
            Ok(Some(_)) => {}
            other => panic!("bob's session was not closed: {other:?}"),
        }
    };
    assert_eq!(code(why), ErrorCode::TokenExpired);
    // ann's session goes on past her first token's end.
    a.ping().await.expect("ann renewed");
    assert_eq!(a.link_stats().connections, 1);
    // A renewal with another user's token is refused and changes nothing.
    let e = a.renew(node.token(bob)).await.expect_err("someone else's token");
    assert_eq!(code(e), ErrorCode::Forbidden);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_requests_beyond_the_rate_are_refused_and_change_nothing() {
    let node = TestNode::start().await;
    let (ann, bob) = (uid(0, 81), uid(1, 81));
    node.befriend(ann, bob).await;
    let a = node.client(ann).await;
    let b = node.client(bob).await;
    a.client.set_name("Ann").await.expect("a good name");
    let too_long = "x".repeat(nearby_raft::shard::command::MAX_NAME_CHARS + 1);
    for bad in ["Ann\u{7}", "An\nn", "Ann\u{202e}\u{0}", "   ", too_long.as_str()] {
        let e = a.client.set_name(bad).await.expect_err("a bad name");
        assert_eq!(code(e), ErrorCode::InvalidArgument, "{bad:?}");
    }
    let list = b.client.list_friends().await.expect("list");
    let entry = list
        .entries
        .iter()
        .find(|e| e.id == ann)
        .expect("ann is bob's friend");
    assert_eq!(entry.name.as_deref(), Some("Ann"), "no refused name was stored");

    // 20 requests a second, bursts of 40: a client that sends more back to back is refused
    // the excess, with nothing done, and served again once its bucket refills.
    let mut limited = 0;
    for _ in 0..100 {
        if let Err(e) = a.client.ping().await {
            assert_eq!(code(e), ErrorCode::RateLimited);
            limited += 1;
        }
    }
    assert!(limited > 0, "100 requests at once must meet the limit");
    until_ok("the session is served again", Duration::from_secs(5), || async {
        let r = a.client.ping().await;
        if let Err(e) = &r {
            assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
        }
        r
    })
    .await;
    node.stop().await;
}
