//! The live product over QUIC: lists, moves, range boundaries, expiry, privacy changes, paging.

use std::time::Duration;

use nearby_client::proto::{Event, GoneReason};
use nearby_client::LocationAck;
use nearby_node::api::Backend;

use crate::util::{uid, TestNode};

// Berlin: B is 3.0 km north of A; FAR is 20 km north; EDGE_OUT is 8.4 km north, EDGE_IN 7.8 km.
const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);
const FAR: (f64, f64) = (52.7000, 13.4050);
const EDGE_OUT: (f64, f64) = (52.5955, 13.4050);
const EDGE_IN: (f64, f64) = (52.5900, 13.4050);
/// Great-circle distance of A–B on the mean Earth radius: 0.027° × 111,195 m.
const AB_M: f64 = 3_002.3;

fn near(d: f64, want: f64) -> bool {
    (d - want).abs() <= want * 0.01
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_3km_apart_see_each_other_and_far_friends_and_strangers_see_nothing() {
    let node = TestNode::start().await;
    let (ann, bob, cat, dan) = (uid(0, 1), uid(1, 1), uid(2, 1), uid(3, 1));
    node.befriend(ann, bob).await;
    node.befriend(ann, cat).await;
    node.befriend(dan, bob).await; // dan is bob's friend, a stranger to ann
    let mut a = node.client(ann).await;
    let mut d = node.client(dan).await;
    let b = node.client(bob).await;
    let c = node.client(cat).await;
    d.at(FAR.0 + 1.0, FAR.1).await; // dan is far from everyone
    a.at(A.0, A.1).await;
    c.at(FAR.0, FAR.1).await; // 20 km from ann: no event, not listed

    // bob starts 3 km from ann: his first page lists ann at 3 km; ann gets "entered".
    let page = match b
        .client
        .update_location(nearby_client::proto::Coord { lat: B.0, lon: B.1 })
        .await
    {
        Ok(LocationAck::Started { page, .. }) => page,
        other => panic!("expected the first page, got {other:?}"),
    };
    assert_eq!(page.friends.len(), 1, "{page:?}");
    assert_eq!(page.friends[0].id, ann);
    assert!(near(page.friends[0].distance_m, AB_M), "{page:?}");
    match a.next_about(bob).await {
        Event::FriendEntered(p) => assert!(near(p.distance_m, AB_M), "{p:?}"),
        e => panic!("expected bob entering, got {e:?}"),
    }
    // ann's list: bob only (cat is 20 km away).
    let list = a.client.list_nearby(None, None).await.expect("list");
    assert_eq!(list.friends.iter().map(|f| f.id).collect::<Vec<_>>(), vec![bob]);
    assert!(near(list.friends[0].distance_m, AB_M));

    // cat moves but stays 20 km away: ann's next event is bob's move, nothing about cat before.
    c.at(FAR.0 + 0.001, FAR.1).await;
    b.at(B.0 + 0.001, B.1).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendMoved(_)));
    // dan (bob's friend, far away) got nothing about ann ever, and nothing about bob (far).
    b.at(B.0, B.1).await;
    a.next_about(bob).await;
    let dan_events = {
        // Bring dan next to bob: the only events dan may see are about bob.
        d.at(B.0, B.1 + 0.001).await;
        let e = d.next().await;
        vec![e]
    };
    assert!(
        dan_events.iter().all(|e| e.friend() == Some(bob)),
        "dan saw {dan_events:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_the_radius_gives_left_and_entered() {
    let node = TestNode::start().await;
    let (ann, bob) = (uid(0, 2), uid(2, 2));
    node.befriend(ann, bob).await;
    let mut a = node.client(ann).await;
    let b = node.client(bob).await;
    a.at(A.0, A.1).await;
    b.at(EDGE_IN.0, EDGE_IN.1).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(p) if p.distance_m < 8_000.0));
    b.at(EDGE_OUT.0, EDGE_OUT.1).await;
    // Leaving names the radius left, never the distance beyond it.
    assert!(matches!(a.next_about(bob).await, Event::FriendLeft { distance_m, .. } if distance_m == 8_000.0));
    b.at(EDGE_IN.0, EDGE_IN.1).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));
    // The viewer moving also crosses: ann walks 20 km away, bob leaves her range.
    a.at(A.0 - 0.2, A.1).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendLeft { .. }));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_expiry_sends_gone() {
    let node = TestNode::start().await;
    let (ann, bob) = (uid(1, 3), uid(3, 3));
    node.befriend(ann, bob).await;
    let mut a = node.client(ann).await;
    let b = node.client(bob).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));
    // Nine minutes: still there. Ann keeps updating; bob does not.
    node.clock.advance(Duration::from_secs(9 * 60));
    a.at(A.0, A.1).await;
    // Past bob's ten minutes: gone.
    node.clock.advance(Duration::from_secs(61));
    match a.next_about(bob).await {
        Event::FriendGone { reason, .. } => assert_eq!(reason, GoneReason::Inactive),
        e => panic!("expected gone, got {e:?}"),
    }
    let list = a.client.list_nearby(None, None).await.expect("list");
    assert!(list.friends.is_empty(), "an inactive friend is listed: {list:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfriending_hiding_and_sharing_off_stop_updates_at_once() {
    let node = TestNode::start().await;
    let (ann, bob, probe) = (uid(0, 4), uid(1, 4), uid(2, 4));
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

    // Hide: gone at once; bob's moves are not sent; unhide brings him back.
    b.client.hide(ann).await.expect("hide");
    assert!(matches!(
        a.next_about(bob).await,
        Event::FriendGone {
            reason: GoneReason::Hidden,
            ..
        }
    ));
    b.at(B.0 + 0.001, B.1).await;
    p.at(B.0, B.1 + 0.011).await;
    a.next_about(probe).await; // nothing about bob came before the probe
    b.client.unhide(ann).await.expect("unhide");
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));

    // Sharing off: gone; moves not sent.
    b.client.set_sharing(false).await.expect("sharing off");
    assert!(matches!(a.next_about(bob).await, Event::FriendGone { .. }));
    b.at(B.0 + 0.002, B.1).await;
    p.at(B.0, B.1 + 0.012).await;
    a.next_about(probe).await;
    b.client.set_sharing(true).await.expect("sharing on");
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));

    // Unfriend: gone; nothing more, either way.
    a.client.remove_friend(bob).await.expect("remove");
    assert!(matches!(
        a.next_about(bob).await,
        Event::FriendGone {
            reason: GoneReason::Unfriended,
            ..
        }
    ));
    b.at(B.0 + 0.003, B.1).await;
    p.at(B.0, B.1 + 0.013).await;
    a.next_about(probe).await;
    let list = a.client.list_nearby(None, None).await.expect("list");
    assert_eq!(list.friends.iter().map(|f| f.id).collect::<Vec<_>>(), vec![probe]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friend_requests_need_consent_and_take_effect_live() {
    let node = TestNode::start().await;
    let (ann, bob) = (uid(0, 5), uid(3, 5));
    let mut a = node.client(ann).await;
    let mut b = node.client(bob).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    assert_eq!(
        a.client.add_friend(bob).await.expect("request"),
        nearby_client::proto::Outcome::FriendRequestSent
    );
    assert!(matches!(b.next_about(ann).await, Event::FriendRequest { .. }));
    // A request alone shows nothing.
    assert!(a
        .client
        .list_nearby(None, None)
        .await
        .expect("list")
        .friends
        .is_empty());
    assert_eq!(
        b.client.add_friend(ann).await.expect("accept"),
        nearby_client::proto::Outcome::FriendshipFormed
    );
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));
    assert!(matches!(b.next_about(ann).await, Event::FriendEntered(_)));
    // Unknown users and self-friendship are refused with their codes.
    let err = a.client.add_friend(uid(1, 999)).await.expect_err("unknown");
    assert_eq!(err.code(), Some(nearby_client::proto::ErrorCode::UnknownUser));
    let err = a.client.add_friend(ann).await.expect_err("self");
    assert_eq!(err.code(), Some(nearby_client::proto::ErrorCode::InvalidArgument));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_twenty_nearest_first_with_a_cursor_over_45_friends() {
    let node = TestNode::start().await;
    let me = uid(0, 100);
    let mut friends = Vec::new();
    for i in 0..45u64 {
        let f = uid((i % 4) as usize, 200 + i);
        node.befriend(me, f).await;
        // Friend i is i × 100 m north (all within 8 km), in a shuffled order of ids.
        let lat = A.0 + ((i * 17) % 45) as f64 * 0.0009;
        node.core
            .update_location(f, nearby_client::proto::Coord { lat, lon: A.1 }, false)
            .await
            .expect("friend location");
        friends.push(f);
    }
    let v = node.client(me).await;
    let first = match v
        .client
        .update_location(nearby_client::proto::Coord { lat: A.0, lon: A.1 })
        .await
    {
        Ok(LocationAck::Started { page, .. }) => page,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.friends.len(), 20);
    let second = v
        .client
        .list_nearby(first.next.clone(), None)
        .await
        .expect("page 2");
    assert_eq!(second.friends.len(), 20);
    let third = v
        .client
        .list_nearby(second.next.clone(), None)
        .await
        .expect("page 3");
    assert_eq!(third.friends.len(), 5);
    assert!(third.next.is_none());
    let all: Vec<_> = first
        .friends
        .iter()
        .chain(&second.friends)
        .chain(&third.friends)
        .collect();
    assert!(
        all.windows(2).all(|w| w[0].distance_m <= w[1].distance_m),
        "not nearest first"
    );
    let mut ids: Vec<_> = all.iter().map(|f| f.id).collect();
    ids.sort_unstable();
    friends.sort_unstable();
    assert_eq!(ids, friends, "every friend exactly once");
    assert!(
        all.iter().all(|f| f.name.starts_with("user ")),
        "names are filled"
    );
    // A bad cursor is a clear error.
    let err = v
        .client
        .list_nearby(Some("garbage!".into()), None)
        .await
        .expect_err("bad cursor");
    assert_eq!(err.code(), Some(nearby_client::proto::ErrorCode::InvalidArgument));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_world_is_live_at_once() {
    let users: Vec<u64> = (0..4).map(|g| uid(g, 7)).collect();
    let seed = nearby_raft::seed::Seed {
        users: users.iter().map(|u| (*u, format!("imported {u}"))).collect(),
        // A ring of friendships across all four groups.
        friendships: (0..4).map(|i| (users[i], users[(i + 1) % 4])).collect(),
        follows: vec![],
    };
    let node = TestNode::start_with(Some(seed)).await;
    let mut a = node.client(users[0]).await;
    let b = node.client(users[1]).await;
    let c = node.client(users[2]).await;
    a.at(A.0, A.1).await;
    c.at(B.0, B.1 + 0.001).await; // not ann's friend: nothing
    b.at(B.0, B.1).await;
    match a.next_about(users[1]).await {
        Event::FriendEntered(p) => assert!(near(p.distance_m, AB_M)),
        e => panic!("{e:?}"),
    }
    let friends = a.client.list_friends().await.expect("friends");
    let mut ids: Vec<u64> = friends.entries.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    let mut want = vec![users[1], users[3]];
    want.sort_unstable();
    assert_eq!(ids, want);
    node.stop().await;
}

/// Under overload (here: a node told to shed at any lag and CPU use at all) periodic updates are
/// refused with `rate_limited` and change nothing — the friend still sees the last accepted
/// position — while a session's start still goes through, and some updates still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_refuses_periodic_updates_and_applies_none_of_them() {
    let service = nearby_node::api::ServiceConfig {
        shed: Some(nearby_node::service::overload::Limits {
            lag: Duration::ZERO,
            cpu: 0.0,
        }),
        ..Default::default()
    };
    let node = TestNode::start_configured(None, service).await;
    let (ann, bob) = (uid(0, 3), uid(1, 3));
    node.befriend(ann, bob).await;
    let mut a = node.client(ann).await;
    let b = node.client(bob).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await; // bob's start is never shed
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));

    // Bob alternates between 1 km and 5 km from ann. Every refused update must leave ann's
    // view at the last accepted one; every accepted one must reach her.
    let spots = [(52.5290, 13.4050, 1_000.8), (52.5650, 13.4050, 5_003.8)];
    let (mut refused, mut accepted) = (0, 0);
    let mut last_accepted_m = AB_M;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0usize;
    while (refused < 3 || accepted < 1) && tokio::time::Instant::now() < deadline {
        let (lat, lon, d) = spots[i % 2];
        i += 1;
        match b
            .client
            .update_location(nearby_client::proto::Coord { lat, lon })
            .await
        {
            Ok(_) => {
                accepted += 1;
                last_accepted_m = d;
                match a.next_about(bob).await {
                    Event::FriendMoved(p) => assert!(near(p.distance_m, d), "{p:?}"),
                    e => panic!("expected bob's move, got {e:?}"),
                }
            }
            Err(e) if e.code() == Some(nearby_client::proto::ErrorCode::RateLimited) => {
                if e.to_string().contains("too many requests") {
                    // The per-session limit, not shedding: wait for the bucket to refill.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                refused += 1;
                let list = a.client.list_nearby(None, None).await.expect("list");
                assert_eq!(list.friends.len(), 1, "{list:?}");
                assert!(
                    near(list.friends[0].distance_m, last_accepted_m),
                    "a refused update moved bob: {list:?}, last accepted at {last_accepted_m} m"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        refused >= 3,
        "the node never shed an update ({accepted} accepted)"
    );
    assert!(accepted >= 1, "the node shed every update ({refused} refused)");
    node.stop().await;
}
