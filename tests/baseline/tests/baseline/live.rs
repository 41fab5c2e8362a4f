//! The live product on the baseline: first page and events, range boundaries, strangers,
//! expiry, and relation and privacy changes on live streams.

use std::time::Duration;

use nearby_client::proto::{Coord, Event, GoneReason, Outcome, Relation};
use nearby_client::LocationAck;

use crate::util::{TestServer, ANN, BOB, CAT, DAN, EVE};

// Berlin: B is 3.0 km north of A; FAR is 20 km north; EDGE_OUT is 8.4 km north, EDGE_IN 7.8 km.
const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);
const FAR: (f64, f64) = (52.7000, 13.4050);
const EDGE_OUT: (f64, f64) = (52.5955, 13.4050);
const EDGE_IN: (f64, f64) = (52.5900, 13.4050);
/// Great-circle distance of A–B on the mean Earth radius: 0.027° × 111,195 m.
const AB_M: f64 = 3_002.3;
const TTL: Duration = Duration::from_secs(600);

fn near(d: f64, want: f64) -> bool {
    (d - want).abs() <= want * 0.01
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_3km_apart_see_each_other_and_far_friends_and_strangers_see_nothing() {
    let server = TestServer::start(TTL).await;
    // The files the `nearby` CLI reads, as `nearby-node dev` writes them.
    let home = |f: &str| std::fs::read_to_string(server.home.path().join(f)).expect("home file");
    assert_eq!(home("endpoint").trim(), server.addr);
    assert_eq!(home("ca.pem"), server.ca_pem);
    assert_eq!(home("server_name").trim(), "localhost");
    let mut a = server.client(ANN).await;
    let mut c = server.client(CAT).await;
    let mut d = server.client(DAN).await;
    let mut e = server.client(EVE).await;
    let b = server.client(BOB).await;
    d.at(FAR.0 + 1.0, FAR.1).await; // dan (bob's friend, a stranger to ann) is far from all
    a.at(A.0, A.1).await;
    c.at(FAR.0, FAR.1).await; // cat is ann's friend, 20 km away
    e.at(A.0, A.1 + 0.001).await; // eve, a stranger, stands next to ann

    // bob starts 3 km from ann: his first page lists ann at 3 km, with her name.
    let page = match b.client.update_location(Coord { lat: B.0, lon: B.1 }).await {
        Ok(LocationAck::Started { page, .. }) => page,
        other => panic!("expected the first page, got {other:?}"),
    };
    assert_eq!(page.friends.len(), 1, "{page:?}");
    assert_eq!((page.friends[0].id, page.friends[0].name.as_str()), (ANN, "ann"));
    assert!(near(page.friends[0].distance_m, AB_M), "{page:?}");
    // ann gets "entered" with the right distance.
    match a.next_about(BOB).await {
        Event::FriendEntered(p) => assert!(near(p.distance_m, AB_M), "{p:?}"),
        e => panic!("expected bob entering, got {e:?}"),
    }
    let list = a.client.list_nearby(None, None).await.expect("list");
    assert_eq!(list.friends.iter().map(|f| f.id).collect::<Vec<_>>(), vec![BOB]);
    assert!(near(list.friends[0].distance_m, AB_M));

    // cat moves but stays 20 km away: ann's next event is bob's move, nothing about cat first.
    c.at(FAR.0 + 0.001, FAR.1).await;
    b.at(B.0 + 0.001, B.1).await;
    match a.next_about(BOB).await {
        Event::FriendMoved(p) => assert!(near(p.distance_m, AB_M + 111.2), "{p:?}"),
        e => panic!("expected bob moving, got {e:?}"),
    }
    // dan comes next to bob: he sees bob, never ann.
    d.at(B.0, B.1 + 0.001).await;
    b.at(B.0, B.1).await;
    a.next_about(BOB).await;
    let seen = d.next_within(Duration::from_secs(10)).await;
    assert_eq!(seen.friend(), Some(BOB), "dan saw {seen:?}");
    // By now every push of this test has been delivered to ann (her last event came after
    // everyone's updates): cat, 20 km away, and eve, a stranger, got nothing about anyone.
    assert!(c.drain().is_empty(), "cat (20 km away) was told something");
    assert!(e.drain().is_empty(), "eve (a stranger) was told something");
    assert!(d.drain().iter().all(|e| e.friend() != Some(ANN)), "dan saw ann");
    // What the original design stores: the latest location with a TTL.
    let stored = server
        .redis_get("loc:2")
        .await
        .expect("bob's location is in Redis");
    assert!(stored.starts_with("52.547,13.405,"), "{stored}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_the_radius_gives_left_and_entered() {
    let server = TestServer::start(TTL).await;
    let mut a = server.client(ANN).await;
    let b = server.client(BOB).await;
    a.at(A.0, A.1).await;
    b.at(EDGE_IN.0, EDGE_IN.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(p) if p.distance_m < 8_000.0));
    b.at(EDGE_OUT.0, EDGE_OUT.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendLeft { distance_m, .. } if distance_m > 8_000.0));
    b.at(EDGE_IN.0, EDGE_IN.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(_)));
    // The viewer moving also crosses: ann walks 20 km away, bob leaves her range.
    a.at(A.0 - 0.2, A.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendLeft { .. }));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_friend_silent_for_the_ttl_is_gone_inactive_and_expires_in_redis() {
    let ttl = Duration::from_secs(2);
    let server = TestServer::start(ttl).await;
    let mut a = server.client(ANN).await;
    let b = server.client(BOB).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(_)));
    // bob stops sending: within the TTL (plus the 200 ms tick) ann is told he is inactive.
    match a.next_within(ttl + Duration::from_secs(5)).await {
        Event::FriendGone { id, reason } => assert_eq!((id, reason), (BOB, GoneReason::Inactive)),
        e => panic!("expected bob gone, got {e:?}"),
    }
    a.at(A.0, A.1).await;
    let list = a.client.list_nearby(None, None).await.expect("list");
    assert!(list.friends.is_empty(), "an inactive friend is listed: {list:?}");
    // Redis dropped the key by its EX too.
    assert_eq!(server.redis_get("loc:2").await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relation_and_privacy_changes_take_effect_on_live_streams() {
    let server = TestServer::start(TTL).await;
    let mut a = server.client(ANN).await;
    let mut e = server.client(EVE).await;
    let b = server.client(BOB).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(_)));

    // Hide and unhide.
    assert_eq!(b.client.hide(ANN).await.expect("hide"), Outcome::Updated);
    match a.next_about(BOB).await {
        Event::FriendGone { reason, .. } => assert_eq!(reason, GoneReason::Hidden),
        e => panic!("expected gone, got {e:?}"),
    }
    b.at(B.0 + 0.001, B.1).await; // hidden: nothing reaches ann
    assert_eq!(b.client.unhide(ANN).await.expect("unhide"), Outcome::Updated);
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(_)));

    // Sharing off and on.
    assert_eq!(b.client.set_sharing(false).await.expect("off"), Outcome::Updated);
    assert!(matches!(
        a.next_about(BOB).await,
        Event::FriendGone {
            reason: GoneReason::Hidden,
            ..
        }
    ));
    b.at(B.0, B.1).await; // not shared: nothing reaches ann, nothing is stored
    assert_eq!(server.redis_get("loc:2").await, None);
    assert_eq!(b.client.set_sharing(true).await.expect("on"), Outcome::Updated);
    assert!(matches!(a.next_about(BOB).await, Event::FriendEntered(_)));

    // Unfriend: gone at once, and bob's later moves reach ann no more.
    assert_eq!(
        a.client.remove_friend(BOB).await.expect("remove"),
        Outcome::FriendRemoved
    );
    assert!(matches!(
        a.next_about(BOB).await,
        Event::FriendGone {
            reason: GoneReason::Unfriended,
            ..
        }
    ));

    // A new friendship with consent: eve asks, ann is told, ann accepts, both see each other.
    e.at(A.0, A.1 + 0.01).await;
    assert_eq!(
        e.client.add_friend(ANN).await.expect("ask"),
        Outcome::FriendRequestSent
    );
    assert!(matches!(
        a.next_about(EVE).await,
        Event::FriendRequest { from: EVE }
    ));
    let friends = a.client.list_friends().await.expect("friends");
    assert!(friends
        .entries
        .iter()
        .any(|f| f.id == EVE && f.relation == Relation::RequestReceived && f.name.as_deref() == Some("eve")));
    assert_eq!(
        a.client.add_friend(EVE).await.expect("accept"),
        Outcome::FriendshipFormed
    );
    assert!(matches!(a.next_about(EVE).await, Event::FriendEntered(_)));
    assert!(matches!(e.next_about(ANN).await, Event::FriendEntered(_)));
    // bob, no longer a friend, moves next to ann: she is told nothing; eve's move comes first.
    b.at(A.0, A.1 + 0.002).await;
    e.at(A.0, A.1 + 0.011).await;
    assert!(matches!(a.next_about(EVE).await, Event::FriendMoved(_)));
    server.stop().await;
}
