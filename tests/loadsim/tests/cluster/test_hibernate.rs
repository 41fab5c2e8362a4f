//! Many groups, cheap: idle groups hibernate on every replica, a write wakes its group, and a
//! dead node wakes only the groups it led.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nearby_loadsim::cluster::ProcessCluster;
use nearby_node::route::peer::PeerResponse;
use nearby_raft::{GroupId, NodeId};

use crate::util::{befriend, cluster, viewer};

/// Whether each running replica of `group` sleeps, by node.
async fn sleeping(c: &ProcessCluster, group: GroupId) -> Vec<(NodeId, bool)> {
    c.replica_states(group, &[])
        .await
        .expect("replica states")
        .into_iter()
        .filter(|(node, _)| c.is_running(*node as u8))
        .map(|(node, answer)| match answer {
            PeerResponse::Replica { asleep, .. } => (node, asleep),
            other => panic!("node {node}'s replica of group {group} did not answer: {other:?}"),
        })
        .collect()
}

/// Waits until every running replica of every group in `groups` sleeps.
async fn wait_asleep(c: &ProcessCluster, groups: &[GroupId], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut awake = Vec::new();
        for g in groups {
            for (node, asleep) in sleeping(c, *g).await {
                if !asleep {
                    awake.push((*g, node));
                }
            }
        }
        if awake.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas (group, node) still awake after {within:?}: {awake:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_sleep_a_write_wakes_its_group_and_a_dead_node_wakes_only_its_groups() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 6).await;
    let groups = c.shard_groups();
    // No client, no write: every replica of every group goes to sleep.
    wait_asleep(&c, &groups, Duration::from_secs(40)).await;

    // A write wakes its group on its leader (and is served as usual).
    let g = groups[0];
    let g_leader = c.leader(g).expect("leader");
    let a = viewer(&c, c.user_in(g, 1).expect("user")).await;
    let b = viewer(&c, c.user_in(g, 2).expect("user")).await;
    befriend(&a, &b).await;
    let woke = sleeping(&c, g).await;
    assert!(
        woke.iter().any(|(n, asleep)| *n == g_leader && !asleep),
        "group {g}'s leader (node {g_leader}) still sleeps after a write: {woke:?}"
    );

    // Kill a node leading sleeping groups (not g's leader, so g's clients stay put).
    let map = c.map();
    let victim = (1..=c.size())
        .map(NodeId::from)
        .find(|n| *n != g_leader && map.groups.values().any(|e| e.leader == Some(*n)))
        .expect("another node leads a group");
    let led: BTreeSet<GroupId> = groups
        .iter()
        .copied()
        .filter(|h| map.leader(*h) == Some(victim))
        .collect();
    let others: Vec<GroupId> = groups
        .iter()
        .copied()
        .filter(|h| *h != g && !led.contains(h))
        .collect();
    let survivors: Vec<u8> = (1..=c.size()).filter(|i| NodeId::from(*i) != victim).collect();
    let storm_wakes = |c: &ProcessCluster| -> usize {
        others
            .iter()
            .flat_map(|h| survivors.iter().map(move |i| (*h, *i)))
            .filter_map(|(h, i)| {
                c.node(i)
                    .map(|n| n.logged(&format!("waking to elect group={h} leader=Some(")))
            })
            .sum()
    };
    let wakes_before = storm_wakes(&c);
    c.kill(victim as u8);
    c.wait_map(
        "new leaders for the dead node's groups",
        Duration::from_secs(20),
        |m| led.iter().all(|h| m.leader(*h).is_some_and(|l| l != victim)),
    )
    .await
    .expect("new leaders");
    // The groups the dead node did not lead were not woken by its death: no heartbeat storm.
    // Once the node is marked down, placement may deliberately move one of their leaders to
    // spread leaders again (waking that group, whether the move then succeeds or not): such a
    // group is told apart by its new leader or by the transfer's log line. A group woken by the
    // death itself would stay awake for IDLE_AFTER (10 s), longer than this wait.
    let transferred = |c: &ProcessCluster, h: GroupId| {
        (1..=c.size()).any(|i| {
            c.node(i).is_some_and(|n| {
                n.logged(&format!("waking the group for a leadership transfer group={h} ")) > 0
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now_map = c.map();
        let mut woken = Vec::new();
        for h in &others {
            let states = sleeping(&c, *h).await;
            let moved = now_map.leader(*h) != map.leader(*h) || transferred(&c, *h);
            if !moved && !states.iter().all(|(_, asleep)| *asleep) {
                woken.push((*h, states));
            }
        }
        if woken.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "groups woke although their leaders live (and placement did not move them): {woken:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        storm_wakes(&c),
        wakes_before,
        "a surviving node woke a group whose leader lives to elect a new one"
    );
    // And the dead node's groups, idle again under their new leaders, sleep again.
    let led: Vec<GroupId> = led.into_iter().collect();
    wait_asleep(&c, &led, Duration::from_secs(40)).await;
    c.stop().await;
}
