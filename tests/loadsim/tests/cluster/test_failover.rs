//! Killed nodes: relations survive on both sides, clients come back, nothing is lost to a
//! restart with other settings.

use std::time::{Duration, Instant};

use nearby_client::proto::{Event, Relation};

use crate::util::{
    befriend, cluster, cluster_with_cuts, retrying, viewer, viewer_via, wait_until, Link, Viewer,
};
use nearby_loadsim::cluster::ProcessCluster;

const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);

/// The relation `viewer` lists with `other`, if any.
async fn relation(v: &Viewer, other: u64) -> Option<Relation> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match v.client.list_friends().await {
            Ok(list) => return list.entries.iter().find(|e| e.id == other).map(|e| e.relation),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("user {}: list friends: {e}", v.user),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_accepted_while_the_second_groups_leader_is_killed_is_on_both_sides() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 3).await;
    let groups = c.shard_groups();
    // ann owns the pair (the smaller id): her group decides; bob's group is the second.
    let (ann, bob) = (
        c.user_in(groups[0], 5).expect("user"),
        c.user_in(groups[2], 5).expect("user"),
    );
    let (ga, gb) = (c.group_of(ann).expect("group"), c.group_of(bob).expect("group"));
    let a = viewer(&c, ann).await;
    let b = viewer(&c, bob).await;
    b.client.add_friend(ann).await.expect("request");
    let _ = b.user;
    // Kill the second group's leader (unless it also leads the deciding group: then its
    // follower is killed... there is always a node leading gb).
    let victim = c.leader(gb).expect("leader") as u8;
    let accept = a.client.add_friend(bob);
    c.kill(victim);
    let outcome = accept.await;
    tracing::info!(?outcome, victim, "accepted while the second group's leader died");
    // Acknowledged or not, the change is committed in ann's group or not at all; when it was
    // acknowledged it must reach both sides.
    if outcome.is_err() {
        // Not acknowledged (the deciding group's leader died with it): ask again.
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.client.add_friend(bob).await.is_err() {
            assert!(Instant::now() < deadline, "the acceptance never went through");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    c.wait_map(
        "a new leader for the second group",
        Duration::from_secs(20),
        |m| m.leader(gb).is_some_and(|l| l != u64::from(victim)),
    )
    .await
    .expect("a new leader");
    // Both sides, read from the groups' (new) leaders; bob's session may have been on the
    // killed node: its client reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ra, rb) = (relation(&a, bob).await, relation(&b, ann).await);
        if ra == Some(Relation::Friend) && rb == Some(Relation::Friend) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one side lost the friendship: ann {ra:?}, bob {rb:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(ga, gb);
    // The killed node comes back and catches up: both sides are on it too.
    c.restart(victim).await.expect("restart");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_come_back_and_friends_reappear() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 3).await;
    let groups = c.shard_groups();
    let (ann, bob) = (
        c.user_in(groups[0], 3).expect("user"),
        c.user_in(groups[1], 3).expect("user"),
    );
    let mut a = viewer(&c, ann).await;
    let b = viewer(&c, bob).await;
    befriend(&a, &b).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    a.expect_about(bob, Duration::from_secs(5), |e| {
        matches!(e, Event::FriendEntered(_))
    })
    .await;
    // Kill the node serving bob (the leader of his home group).
    let victim = c.leader(c.group_of(bob).expect("group")).expect("leader") as u8;
    let killed = Instant::now();
    c.kill(victim);
    // bob's app keeps sending; the SDK notices, reconnects to the new leader and re-sends.
    b.at(B.0 + 0.001, B.1).await;
    let served = killed.elapsed();
    // ann sees him again: on her list (her own session may have moved too, if her group was
    // led by the same node), with no action of hers.
    a.sees(bob, Duration::from_secs(10)).await;
    tracing::info!(?served, seen = ?killed.elapsed(), "bob served again, ann sees him again");
    assert!(
        served < Duration::from_secs(10),
        "bob was served again only after {served:?}"
    );
    c.restart(victim).await.expect("restart");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_node_with_another_groups_value_loses_nothing() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 3).await;
    let groups = c.shard_groups();
    let (ann, bob) = (
        c.user_in(groups[0], 1).expect("user"),
        c.user_in(groups[2], 1).expect("user"),
    );
    let a = viewer(&c, ann).await;
    let b = viewer(&c, bob).await;
    befriend(&a, &b).await;
    let before = c.map();
    c.kill(2);
    c.write_config(2, c.groups() + 5).expect("config");
    c.restart(2).await.expect("restart");
    wait_until("node 2 has the cluster's map", Duration::from_secs(20), || {
        c.map_of(2).is_some_and(|m| m.epoch >= before.epoch)
    })
    .await;
    let after = c.map();
    let ranges =
        |m: &nearby_raft::ClusterMap| m.groups.iter().map(|(g, e)| (*g, e.range)).collect::<Vec<_>>();
    assert_eq!(
        ranges(&after),
        ranges(&before),
        "a config edit changed the ranges"
    );
    assert_eq!(relation(&a, bob).await, Some(Relation::Friend));
    assert_eq!(relation(&b, ann).await, Some(Relation::Friend));
    c.stop().await;
}

/// Two users of groups led by different nodes: (viewer, the other), or `None`.
fn apart(c: &ProcessCluster) -> Option<(u64, u64)> {
    let groups = c.shard_groups();
    for &g in &groups {
        for &h in &groups {
            if c.leader(g).is_some() && c.leader(h).is_some() && c.leader(g) != c.leader(h) {
                return Some((c.user_in(g, 7)?, c.user_in(h, 7)?));
            }
        }
    }
    None
}

/// Ann, whose client dials only `via` (her group's leader, or a link in front of it: it keeps
/// asking there), and bob, through any node: friends, both located, ann seeing bob.
async fn friends_seen_via(c: &ProcessCluster, ann: u64, bob: u64, via: String) -> (Viewer, Viewer) {
    let mut cfg = c.client_config(ann, &[]).with_endpoints([via]);
    cfg.request_timeout = Duration::from_secs(10);
    let client = c.connect(cfg).await.expect("ann connects");
    let events = client.events().expect("events");
    let a = Viewer {
        user: ann,
        client,
        events,
    };
    let b = viewer(c, bob).await;
    befriend(&a, &b).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    a.sees(bob, Duration::from_secs(10)).await;
    (a, b)
}

/// A leader cut off from the other nodes (not from its clients) while they elect another, asked
/// for a page after a friend of its viewer hid from her — the hide acknowledged through the
/// group's new leader — shows that friend on no page: what the deposed node still holds in
/// memory is not served without a lease (a quorum's answer to a round of heartbeats), and it
/// gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_shows_nothing_hidden_since() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster_with_cuts(3, 3).await;
    let (ann, bob) = apart(&c).expect("two groups led by different nodes");
    let ga = c.group_of(ann).expect("group");
    let deposed = c.leader(ga).expect("leader") as u8;
    let (a, b) = friends_seen_via(&c, ann, bob, c.client_addr(deposed).to_string()).await;

    c.cut_off(deposed, true).expect("cut");
    c.wait_map("a new leader of ann's group", Duration::from_secs(20), |m| {
        m.leader(ga).is_some_and(|l| l != u64::from(deposed))
    })
    .await
    .expect("a new leader");
    // Bob hides from ann; acknowledged once her group's new leader has forgotten him.
    retrying("bob hides from ann", || b.client.hide(ann)).await;

    // Every page the cut-off node answers from now on omits bob (it answers none: it cannot
    // confirm that it leads).
    for _ in 0..3 {
        match a.client.list_nearby(None, None).await {
            Ok(page) => assert!(
                page.friends.iter().all(|f| f.id != bob),
                "a page after the hide's acknowledgement shows bob: {page:?}"
            ),
            Err(e) => tracing::info!(%e, "the cut-off node did not answer the page"),
        }
    }
    c.cut_off(deposed, false).expect("heal");
    let page = retrying("ann's page", || a.client.list_nearby(None, None)).await;
    assert!(page.friends.iter().all(|f| f.id != bob), "bob is back: {page:?}");
    c.stop().await;
}

/// A viewer's client whose link went dead while its group's leader sent it a friend's new
/// position; the leader is then cut off from the other nodes, the group elects another, and the
/// friend hides from the viewer — acknowledged through the new leader, which never held the
/// viewer's session. The deposed leader would send the position again once the link is back;
/// it must not reach the viewer after the hide was acknowledged: the deposed leader closes a
/// connection holding unacknowledged events soon after its lease ended, and a new leader holds
/// its acknowledgements for longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_sends_nothing_after_a_hide_its_successor_acknowledged() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster_with_cuts(3, 3).await;
    let (ann, bob) = apart(&c).expect("two groups led by different nodes");
    let ga = c.group_of(ann).expect("group");
    let deposed = c.leader(ga).expect("leader") as u8;
    let link = Link::start(c.client_addr(deposed)).await;
    let (mut a, b) = friends_seen_via(&c, ann, bob, link.addr.clone()).await;
    while a.next_within(Duration::from_millis(200)).await.is_some() {}

    // Bob moves while ann's link is dead: the deposed-to-be leader sends it into the void.
    link.set_dead(true);
    let before = link.dropped();
    let moved_to = B.0 + 0.002;
    b.at(moved_to, B.1).await;
    wait_until(
        "the position is sent to ann's dead link",
        Duration::from_secs(5),
        || link.dropped() > before,
    )
    .await;

    c.cut_off(deposed, true).expect("cut");
    c.wait_map("a new leader of ann's group", Duration::from_secs(20), |m| {
        m.leader(ga).is_some_and(|l| l != u64::from(deposed))
    })
    .await
    .expect("a new leader");
    retrying("bob hides from ann", || b.client.hide(ann)).await;
    link.set_dead(false);

    // Whatever reaches ann from now on — the deposed node sending again, a goodbye, a
    // reconnection's page — says nothing of where bob is.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(e) = a
        .next_within(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        assert!(
            e.friend() != Some(bob) || matches!(e, Event::FriendGone { .. }),
            "ann got {e:?} about bob after his hide was acknowledged"
        );
    }
    c.cut_off(deposed, false).expect("heal");
    c.stop().await;
}

/// A "hide" sent again while its first attempt still waits for the viewers' group (a second
/// device, an app that retried after a reconnect) is confirmed only once that group has
/// confirmed it — not at once because the second attempt changed nothing. The viewer's group
/// leader is cut off, so no confirmation can come before the group has another leader:
/// followers refuse to elect one for 800 ms after they last heard from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hide_sent_again_is_confirmed_only_once_the_viewers_group_confirmed_it() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster_with_cuts(3, 3).await;
    let (ann, bob) = apart(&c).expect("two groups led by different nodes");
    let ga = c.group_of(ann).expect("group");
    let a = viewer(&c, ann).await;
    let b = viewer(&c, bob).await;
    // Bob's second device.
    let again = viewer(&c, bob).await;
    befriend(&a, &b).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    a.sees(bob, Duration::from_secs(10)).await;

    let cut = c.leader(ga).expect("leader") as u8;
    assert_ne!(c.leader(c.group_of(bob).expect("group")), Some(u64::from(cut)));
    c.cut_off(cut, true).expect("cut");
    // The cut takes effect within the nodes' 100 ms re-read of their fault files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let first = {
        let client = b.client.clone();
        tokio::spawn(async move { client.hide(ann).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    retrying("bob hides ann again from his second device", || {
        again.client.hide(ann)
    })
    .await;
    let confirmed = started.elapsed();
    tracing::info!(?confirmed, "the second hide was confirmed");
    assert!(
        confirmed >= nearby_raft::LEADER_LEASE,
        "the second hide was confirmed {confirmed:?} after ann's group leader was cut off: \
         before any other node could lead that group"
    );
    if let Err(e) = first.await.expect("task") {
        assert!(e.is_retryable(), "the first hide failed: {e}");
    }
    c.cut_off(cut, false).expect("heal");
    c.stop().await;
}

/// Whether node `node`'s replica of `group` has `user` befriended with `friend`.
async fn replica_has_friend(c: &ProcessCluster, node: u64, group: u64, user: u64, friend: u64) -> bool {
    use nearby_node::route::peer::PeerResponse;
    let Ok(answers) = c.replica_states(group, &[user]).await else {
        return false;
    };
    answers.iter().any(|(n, a)| {
        *n == node
            && matches!(a, PeerResponse::Replica { records, .. }
                if records.iter().any(|(u, r)| *u == user && r.friends.contains(&friend)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_at_a_new_address_catches_up_and_serves_there() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 3).await;
    let groups = c.shard_groups();
    let (ann, bob) = (
        c.user_in(groups[0], 7).expect("user"),
        c.user_in(groups[1], 7).expect("user"),
    );
    let (ga, gb) = (c.group_of(ann).expect("group"), c.group_of(bob).expect("group"));
    // As a rescheduled pod: gone at once, back on its data at another IP.
    c.kill(3);
    c.restart_at(3, 9)
        .await
        .expect("node 3 starts at its new address");
    let raft = format!("{}:7401", std::net::Ipv4Addr::from(c.ip(3)));
    wait_until(
        "every node's map has node 3 at its new address",
        Duration::from_secs(20),
        || {
            (1..=3).all(|i| {
                c.map_of(i)
                    .is_some_and(|m| m.node(3).is_some_and(|n| n.raft == raft))
            })
        },
    )
    .await;
    // A write made now reaches node 3's replicas: the groups' leaders (whose memberships still
    // hold the old address) replicate to the new one.
    let a = viewer_via(&c, ann, &[1, 2]).await;
    let b = viewer_via(&c, bob, &[1, 2]).await;
    befriend(&a, &b).await;
    for (group, user, friend) in [(ga, ann, bob), (gb, bob, ann)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica_has_friend(&c, 3, group, user, friend).await {
            assert!(
                Instant::now() < deadline,
                "node 3's replica of group {group} never got the friendship made after its move"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Placement gives node 3 leaderships again; a client of one of its groups is served at the
    // new address.
    c.wait_map("node 3 leads a group again", Duration::from_secs(30), |m| {
        m.groups
            .iter()
            .any(|(g, e)| *g != nearby_raft::META_GROUP && e.leader == Some(3))
    })
    .await
    .expect("node 3 leads a group");
    let led = c
        .shard_groups()
        .into_iter()
        .find(|g| c.leader(*g) == Some(3))
        .expect("a group led by node 3");
    let carl = c.user_in(led, 11).expect("user");
    let v = viewer_via(&c, carl, &[3]).await;
    v.at(A.0, A.1).await;
    c.stop().await;
}
