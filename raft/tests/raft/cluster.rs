//! Shard groups replicated over the real QUIC transport on loopback.

use std::time::Duration;

use nearby_index::friends::UserRange;
use nearby_raft::{Command, CommandResult, ProposeError};

use crate::util::{wait_until, Cluster};

fn range() -> UserRange {
    UserRange::new(1, 1_000_000).expect("range")
}

fn register(user: u64) -> Command {
    Command::RegisterUser {
        user,
        name: format!("user {user}"),
    }
}

/// Proposes at the current leader, following leader changes, until it commits.
async fn propose(c: &Cluster, group: u64, cmd: Command) -> CommandResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let leader = c.leader(group).await;
        let g = c.host(leader).shard(group).expect("group");
        match g.propose(cmd.clone()).await {
            Ok(r) => return r,
            Err(e @ (ProposeError::NotLeader { .. } | ProposeError::Unavailable { .. }))
                if std::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "retrying proposal");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("proposal {cmd} failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_loses_no_committed_write_and_old_leader_catches_up() {
    let mut c = Cluster::start(3).await;
    c.create_group(7, range(), 0).await;

    // Commit a first batch of writes.
    for u in 1..=20 {
        assert_eq!(propose(&c, 7, register(u)).await, CommandResult::Registered);
    }
    for u in (1..=19).step_by(2) {
        assert_eq!(
            propose(&c, 7, Command::AddFriend { from: u, to: u + 1 }).await,
            CommandResult::FriendRequestSent
        );
        assert_eq!(
            propose(&c, 7, Command::AddFriend { from: u + 1, to: u }).await,
            CommandResult::FriendshipFormed
        );
    }

    // Stop the leader: a new one must be elected among the other two.
    let old = c.leader(7).await;
    c.stop(old).await;
    let new = c.leader(7).await;
    assert_ne!(new, old);

    // Every acknowledged write is there on the new leader (read linearizably: a new leader
    // applies the entries it inherited only after committing one of its own).
    let g = c.host(new).shard(7).expect("group");
    g.read_linearizable(|s| {
        for u in 1..=20u64 {
            let r = s.user(u).unwrap_or_else(|| panic!("user {u} lost"));
            let friend = if u % 2 == 1 { u + 1 } else { u - 1 };
            assert!(r.friends.contains(friend), "friendship {u}-{friend} lost");
        }
    })
    .await
    .expect("the new leader answers a linearizable read");

    // The group keeps accepting writes with one replica down.
    for u in 21..=30 {
        assert_eq!(propose(&c, 7, register(u)).await, CommandResult::Registered);
    }

    // The old leader restarts from its files and catches up.
    c.restart(old).await;
    let back = c.host(old).open_shard(7, range()).await.expect("reopen");
    let target = g.last_applied().expect("applied").index;
    wait_until(
        "the restarted replica catches up",
        Duration::from_secs(15),
        || {
            let ok = back.last_applied().is_some_and(|l| l.index >= target);
            async move { ok }
        },
    )
    .await;
    let leader_state = g.read(|s| s.clone());
    assert_eq!(back.read(|s| s.clone()), leader_state);
    assert_eq!(leader_state.len(), 30);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_far_behind_catches_up_by_snapshot() {
    let raft = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(40),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..nearby_raft::host::default_raft_config()
    };
    let wal = nearby_raft::wal::WalOptions {
        segment_bytes: 4096,
        ..Default::default()
    };
    let mut c = Cluster::start_with_config(3, raft, wal).await;
    c.create_group(3, range(), 0).await;
    let leader = c.leader(3).await;
    let behind = (leader + 1) % 3;
    c.stop(behind).await;

    for u in 1..=200 {
        propose(&c, 3, register(u)).await;
    }
    // The leader has snapshotted and purged the entries the stopped replica lacks.
    let leader = c.leader(3).await;
    let lh = c.host(leader);
    wait_until("the leader purges its log", Duration::from_secs(15), || {
        let purged = lh.wal().log_state(3).0.map(|l| l.index).unwrap_or(0);
        async move { purged > 100 }
    })
    .await;
    // Purged segments are deleted from disk too.
    assert!(lh.wal().segment_count() < 20, "old segments were not deleted");

    c.restart(behind).await;
    let g = c.host(behind).open_shard(3, range()).await.expect("reopen");
    let lg = c.host(leader).shard(3).expect("leader group");
    let target = lg.last_applied().expect("applied").index;
    wait_until("the lagging replica catches up", Duration::from_secs(20), || {
        let ok = g.last_applied().is_some_and(|l| l.index >= target);
        async move { ok }
    })
    .await;
    // It could only have caught up through a snapshot: the leader no longer has those entries.
    let snap = g.raft().metrics().borrow().snapshot;
    assert!(
        snap.is_some_and(|s| s.index > 100),
        "no snapshot was installed: {snap:?}"
    );
    assert_eq!(g.read(|s| s.clone()), lg.read(|s| s.clone()));
    assert_eq!(g.read(|s| s.len()), 200);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_groups_share_a_node_without_blocking_each_other() {
    let c = Cluster::start(3).await;
    let groups: Vec<u64> = (1..=16).collect();
    for &g in &groups {
        let start = g * 1_000_000;
        let r = UserRange::new(start, start + 1_000_000).expect("range");
        // Spread initial leadership over the three hosts.
        c.create_group(g, r, (g % 3) as usize).await;
    }
    // Concurrent writes to all 16 groups.
    let mut tasks = tokio::task::JoinSet::new();
    for &g in &groups {
        let leader = c.leader(g).await;
        let handle = c.host(leader).shard(g).expect("group");
        tasks.spawn(async move {
            for u in 0..10 {
                let user = g * 1_000_000 + u;
                handle.propose(register(user)).await.expect("commit");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer");
    }
    for &g in &groups {
        for i in 0..3 {
            let h = c.host(i).shard(g).expect("group");
            let target = g * 1_000_000 + 9;
            wait_until("replicas apply", Duration::from_secs(10), || {
                let ok = h.read(|s| s.user(target).is_some());
                async move { ok }
            })
            .await;
        }
    }

    // Take group 1's quorum away: its write cannot commit ...
    let stalled_leader = c.leader(1).await;
    for i in (0..3).filter(|&i| i != stalled_leader) {
        c.host(i).close_group(1).await;
    }
    let stalled = c.host(stalled_leader).shard(1).expect("group 1");
    let stuck = tokio::spawn(async move { stalled.propose(register(1_000_500)).await });

    // ... while the other 15 groups, on the same WAL and connections, keep committing.
    for &g in &groups[1..] {
        let leader = c.leader(g).await;
        let handle = c.host(leader).shard(g).expect("group");
        tokio::time::timeout(
            Duration::from_secs(5),
            handle.propose(register(g * 1_000_000 + 100)),
        )
        .await
        .unwrap_or_else(|_| panic!("group {g} was blocked by group 1"))
        .expect("commit");
    }
    assert!(!stuck.is_finished(), "group 1 committed without a quorum");
    stuck.abort();
    c.shutdown().await;
}

/// One node leading group 1 (users 100–199) with user 150 registered, and the log's last index
/// after that.
async fn one_node_group_with_user_150() -> (Cluster, nearby_raft::ShardGroup, Option<u64>) {
    let c = Cluster::start(1).await;
    let r = UserRange::new(100, 200).expect("range");
    c.create_group(1, r, 0).await;
    c.leader(1).await;
    let g = c.host(0).shard(1).expect("group");
    g.propose(register(150)).await.expect("register");
    let before = g.raft().metrics().borrow().last_log_index;
    (c, g, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_are_rejected_before_the_log() {
    let (c, g, before) = one_node_group_with_user_150().await;

    let bad = [
        (Command::AddFriend { from: 150, to: 150 }, "self-friendship"),
        (Command::SetSharing { user: 151, on: false }, "unknown user"),
        (register(250), "outside the range"),
        (
            Command::AddFriend { from: 300, to: 400 },
            "both outside the range",
        ),
        (register(0), "reserved id"),
        (
            Command::SetName {
                user: 150,
                name: "".into(),
            },
            "empty name",
        ),
    ];
    for (cmd, why) in bad {
        match g.propose(cmd.clone()).await {
            Err(ProposeError::Invalid(e)) => tracing::debug!(%cmd, %e, "rejected as expected"),
            other => panic!("{why}: {cmd} was not rejected: {other:?}"),
        }
    }
    assert_eq!(
        g.raft().metrics().borrow().last_log_index,
        before,
        "an invalid command reached the log"
    );
    // A friend in another group is accepted: that half lives elsewhere.
    assert_eq!(
        g.propose(Command::AddFriend { from: 150, to: 9_999 })
            .await
            .expect("cross-group"),
        CommandResult::FriendRequestSent
    );
    c.shutdown().await;
}

/// A leadership hand-over holds a group's proposals: none reaches the log while the hold
/// lasts, and each goes on, answered, once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_held_for_a_hand_over_reach_the_log_only_after_it() {
    let (c, g, before) = one_node_group_with_user_150().await;

    let held = g
        .hold_writes(Duration::from_secs(5))
        .await
        .expect("nothing under way");
    let proposer = g.clone();
    let mut waiting = tokio::spawn(async move { proposer.propose(register(151)).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a proposal was answered during the hold"
    );
    assert_eq!(
        g.raft().metrics().borrow().last_log_index,
        before,
        "a held proposal reached the log"
    );
    // A second hold waits for the first: it cannot be had meanwhile.
    assert!(g.hold_writes(Duration::from_millis(100)).await.is_none());

    drop(held);
    let answered = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered once the hold ended")
        .expect("the task");
    assert_eq!(answered.expect("committed"), CommandResult::Registered);
    assert!(g.raft().metrics().borrow().last_log_index > before);
    c.shutdown().await;
}
