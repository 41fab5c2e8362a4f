//! Friends homed on different nodes, redirects, and placement on 3 and 5 nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nearby_client::proto::Event;
use nearby_raft::META_GROUP;

use nearby_loadsim::cluster::ProcessCluster;

use crate::util::{befriend, cluster, viewer, viewer_via};

// Two points about 3 km apart in Berlin.
const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);

/// Two users whose home groups are led by different nodes.
fn users_on_two_nodes(c: &ProcessCluster) -> (u64, u64) {
    let groups = c.shard_groups();
    for &g in &groups {
        for &h in &groups {
            if c.leader(g) != c.leader(h) {
                return (c.user_in(g, 7).expect("user"), c.user_in(h, 9).expect("user"));
            }
        }
    }
    panic!("every group is led by one node: {:?}", c.map());
}

async fn friends_on_different_nodes_see_each_other_move(c: &ProcessCluster) {
    let (ann, bob) = users_on_two_nodes(c);
    let (ga, gb) = (c.group_of(ann), c.group_of(bob));
    assert_ne!(c.leader(ga.expect("group")), c.leader(gb.expect("group")));
    let mut a = viewer(c, ann).await;
    let b = viewer(c, bob).await;
    befriend(&a, &b).await;
    a.at(A.0, A.1).await;
    b.at(B.0, B.1).await;
    a.expect_about(bob, Duration::from_secs(5), |e| {
        matches!(e, Event::FriendEntered(_))
    })
    .await;
    // A move crosses nodes within a second.
    for step in 1..=5 {
        let sent = Instant::now();
        b.at(B.0 + 0.0001 * f64::from(step), B.1).await;
        a.expect_about(bob, Duration::from_secs(1), |e| {
            matches!(e, Event::FriendMoved(_))
        })
        .await;
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "a move took {:?}",
            sent.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spread_replicas_and_leaders_and_friends_across_nodes_see_each_other() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster(3, 6).await;
    let map = c.map();
    assert_eq!(map.groups[&META_GROUP].voters.len(), 3);
    let mut leaders: BTreeMap<u64, usize> = BTreeMap::new();
    for g in c.shard_groups() {
        *leaders.entry(c.leader(g).expect("leader")).or_default() += 1;
    }
    assert_eq!(leaders.len(), 3, "leaders all on some nodes: {leaders:?}");
    friends_on_different_nodes_see_each_other_move(&c).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_place_three_replicas_per_group_evenly() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster(5, 10).await;
    // Replicas even out by moves after the first ones are placed.
    c.wait_map("replicas spread evenly", Duration::from_secs(90), |m| {
        let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
        for (id, g) in &m.groups {
            if *id != META_GROUP {
                for n in &g.voters {
                    *per_node.entry(*n).or_default() += 1;
                }
            }
        }
        let (min, max) = (per_node.values().min(), per_node.values().max());
        per_node.len() == 5
            && max.zip(min).is_some_and(|(a, b)| a - b <= 1)
            && m.groups
                .values()
                .all(|g| g.voters.len() == 3 && g.learners.is_empty())
    })
    .await
    .expect("replicas spread");
    let meta: Vec<u64> = c.map().groups[&META_GROUP].voters.iter().copied().collect();
    assert_eq!(meta, vec![1, 2, 3]);
    friends_on_different_nodes_see_each_other_move(&c).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_wrong_node_is_redirected_and_served() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster(3, 3).await;
    let g = c.shard_groups()[0];
    let user = c.user_in(g, 1).expect("user");
    let leader = c.leader(g).expect("leader") as u8;
    let other = (1..=3).find(|n| *n != leader).expect("another node");
    // The client knows only a node that does not lead its home group: no proxy exists, so being
    // served at all means it followed the redirect.
    let v = viewer_via(&c, user, &[other]).await;
    v.at(A.0, A.1).await;
    let page = v
        .client
        .list_nearby(None, None)
        .await
        .expect("served after the redirect");
    assert!(page.friends.is_empty());
    c.stop().await;
}
