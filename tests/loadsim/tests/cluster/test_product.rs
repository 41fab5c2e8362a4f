//! The product beyond friends on three processes: a ghost timer that ends by itself on the
//! node that leads the group after its first leader was killed, and strangers seen and
//! retracted across nodes; a ghost timer that a node's clock jumping ahead does not end.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nearby_client::proto::{Event, GhostMode};
use nearby_client::{Millis, UserId};
use nearby_loadsim::cluster::{NodeFaults, ProcessCluster};

use crate::util::{befriend, cluster, cluster_with_cuts, retrying, viewer, Viewer};

const A: (f64, f64) = (52.5200, 13.4050);
const B: (f64, f64) = (52.5470, 13.4050);

/// Two shard groups led by different nodes.
fn groups_on_two_nodes(c: &ProcessCluster) -> (u64, u64) {
    let groups = c.shard_groups();
    for &g in &groups {
        for &h in &groups {
            if g != h && c.leader(g) != c.leader(h) {
                return (g, h);
            }
        }
    }
    panic!("every group is led by one node: {:?}", c.map());
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_timer_ends_by_itself_after_a_leader_change_and_strangers_cross_nodes() {
    let _serial = crate::util::one_at_a_time().await;
    let (mut c, _dir) = cluster(3, 3).await;
    let (ga, gc) = groups_on_two_nodes(&c);
    // carl's id is searched for in history files: 8 bytes that cannot turn up by chance.
    let (ann, carl) = (
        c.user_in(ga, 11).expect("user"),
        c.user_in(gc, 0x0123_4567_89ab_cdef).expect("user"),
    );

    // --- strangers across nodes: carl (discoverable) is seen by ann, then retracted at once.
    let mut a = viewer(&c, ann).await;
    let cl = viewer(&c, carl).await;
    a.at(A.0, A.1).await;
    cl.at(B.0, B.1).await;
    retrying("discoverable", || cl.client.set_discoverable(true)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let page = retrying("strangers", || a.client.list_strangers(None)).await;
        if let Some(s) = page.strangers.first() {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "carl never seen as a stranger");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen.name, format!("user {carl}"));
    assert_eq!(seen.distance_m, 3_500, "3.0 km rounds up to 3.5 km: {seen:?}");
    retrying("discoverable off", || cl.client.set_discoverable(false)).await;
    // Acknowledged: the retraction reached ann's node first.
    let gone = a
        .expect_about_stranger(&seen.pseudonym, Duration::from_secs(5))
        .await;
    assert_eq!(
        gone,
        Event::StrangerGone {
            pseudonym: seen.pseudonym.clone()
        }
    );
    let page = retrying("strangers", || a.client.list_strangers(None)).await;
    assert!(page.strangers.is_empty(), "{page:?}");

    // --- a timed ghost mode outlives its group's leader.
    let until = befriend_then_ghost(&mut a, &cl, 15).await;
    let victim = c.leader(gc).expect("leader") as u8;
    assert_ne!(c.leader(ga), Some(u64::from(victim)));
    c.kill(victim);
    c.wait_map("a new leader for carl's group", Duration::from_secs(20), |m| {
        m.leader(gc).is_some_and(|l| l != u64::from(victim))
    })
    .await
    .expect("a new leader");
    // carl's client comes back by itself; its location reaches the new leader (a phone sends
    // one at the next cadence anyway). From here on nobody acts.
    cl.at(B.0, B.1).await;
    assert!(
        now_ms() + 2_000 < until.0,
        "the failover took too long to show anything: the ghost mode is almost over"
    );
    back_once_the_ghost_mode_ends(&mut a, carl, until).await;

    // --- a history deletion the killed node missed: it purges its files once back.
    let dirs: Vec<std::path::PathBuf> = (1..=3).map(|n| c.data(n).join("history")).collect();
    // Whether node `node`'s files hold a record of carl's taken before `t` (a record is the
    // user's 8 bytes, then the time's 8 bytes, little-endian). Locations after the deletion are
    // new history (carl's client re-sends its location when its session moves).
    let holds_before = |node: u8, t: u64| {
        files_under(&dirs[usize::from(node) - 1]).iter().any(|bytes| {
            bytes.windows(16).any(|w| {
                w[..8] == carl.to_le_bytes()
                    && u64::from_le_bytes(w[8..16].try_into().unwrap_or([0xff; 8])) < t
            })
        })
    };
    let deleting = now_ms();
    assert!(
        holds_before(victim, deleting),
        "carl's history was not recorded by the node leading his group"
    );
    retrying("delete history", || cl.client.delete_history()).await;
    let page = retrying("history", || cl.client.read_history(None, None, None)).await;
    assert!(page.points.is_empty(), "{page:?}");
    c.restart(victim).await.expect("the killed node comes back");
    let deadline = Instant::now() + Duration::from_secs(40);
    while holds_before(victim, deleting) {
        assert!(
            Instant::now() < deadline,
            "the node that missed the deletion still holds carl's history"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for n in 1..=3 {
        assert!(
            !holds_before(n, deleting),
            "node {n} still holds carl's deleted history"
        );
    }
}

/// The contents of every file under `dir` (none if it does not exist).
fn files_under(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push(bytes);
            }
        }
    }
    out
}

impl Viewer {
    /// Waits for the next event about the stranger `pseudonym`, skipping others.
    async fn expect_about_stranger(&mut self, pseudonym: &str, within: Duration) -> Event {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) if e.stranger() == Some(pseudonym) && matches!(e, Event::StrangerGone { .. }) => {
                    return e
                }
                Some(e) => seen.push(e),
                None => break,
            }
        }
        panic!(
            "user {}: no StrangerGone for {pseudonym} within {within:?}; saw {seen:?}",
            self.user
        );
    }
}

/// A timed ghost mode is a promise in people's time: the node leading the user's group having
/// its system clock stepped a minute ahead must not end it (without the clock guard, the
/// node's next tick ended it and the friend saw the user at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_jumps_ahead_ends_no_ghost_mode_early() {
    let _serial = crate::util::one_at_a_time().await;
    let (c, _dir) = cluster_with_cuts(3, 3).await;
    let (ga, gc) = groups_on_two_nodes(&c);
    let (ann, carl) = (c.user_in(ga, 21).expect("user"), c.user_in(gc, 22).expect("user"));
    let mut a = viewer(&c, ann).await;
    let cl = viewer(&c, carl).await;
    a.at(A.0, A.1).await;
    cl.at(B.0, B.1).await;
    let until = befriend_then_ghost(&mut a, &cl, 20).await;

    let leader = c.leader(gc).expect("a leader") as u8;
    c.set_faults(
        leader,
        &NodeFaults {
            skew_ms: 60_000,
            ..NodeFaults::default()
        },
    )
    .expect("fault file");
    // The node reads its fault file every 100 ms and ticks every second; carl keeps moving, and
    // each of his locations would reach ann if his ghost mode had ended.
    let watch_until = Instant::now() + Duration::from_secs(4);
    let mut step = 0.0;
    while Instant::now() < watch_until {
        step += 0.0005;
        cl.at(B.0, B.1 + step).await;
        if let Some(e) = a.next_within(Duration::from_millis(400)).await {
            assert_ne!(
                e.friend(),
                Some(carl),
                "carl shown during his ghost mode by a clock a minute ahead: {e:?}"
            );
        }
    }
    let page = retrying("page", || a.client.list_nearby(None, None)).await;
    assert!(page.friends.iter().all(|f| f.id != carl), "{page:?}");
    assert!(
        !c.logged_ever("the system clock stepped").is_empty(),
        "the node never noticed its clock's step"
    );

    // Healed: the ghost mode still ends on time by the true clock.
    c.set_faults(leader, &NodeFaults::default()).expect("fault file");
    back_once_the_ghost_mode_ends(&mut a, carl, until).await;
}

/// Makes `a` and `ghost` friends, then puts `ghost` in a ghost mode of `seconds`; returns when it
/// ends, once `a` was told `ghost` went.
async fn befriend_then_ghost(a: &mut Viewer, ghost: &Viewer, seconds: u64) -> Millis {
    befriend(a, ghost).await;
    a.expect_about(ghost.user, Duration::from_secs(10), |e| {
        matches!(e, Event::FriendEntered(_))
    })
    .await;
    let until = retrying("ghost", || ghost.client.set_ghost(GhostMode::For { seconds }))
        .await
        .expect("ghost on");
    a.expect_about(ghost.user, Duration::from_secs(5), |e| {
        matches!(e, Event::FriendGone { .. })
    })
    .await;
    until
}

/// Waits until `a` sees `friend` again by itself, and checks it was not before `until`, when
/// the friend's ghost mode ended.
async fn back_once_the_ghost_mode_ends(a: &mut Viewer, friend: UserId, until: Millis) {
    let back = a
        .expect_about(friend, Duration::from_secs(30), |e| {
            matches!(e, Event::FriendEntered(_))
        })
        .await;
    let at = now_ms();
    assert!(
        at + 500 >= until.0,
        "{friend} was back {} ms before the ghost mode ended: {back:?}",
        until.0.saturating_sub(at)
    );
}
