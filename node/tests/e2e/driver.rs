//! The batched client driver (`service::driver`) where quinn's own tasks never had to be tested
//! by us: one `sendmmsg` carrying many sessions' pushes, a connection that closes while pushes
//! to it and others are batched, a client that stops acknowledging and comes back, and a client
//! whose address changes under a live connection (a NAT rebinding). The last two go through a
//! UDP relay in front of the node that can drop everything or move to a new port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_client::proto::Event;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::util::{uid, TestNode, Viewer};

const A: (f64, f64) = (52.5200, 13.4050);

/// A UDP relay between one client and the node: it forwards both ways from a socket of its own
/// (the address the node sees), and can drop everything (`silence`) or move to a new socket
/// (`rebind`: the node sees the client come from a new port, as behind a NAT).
struct Relay {
    addr: String,
    silent: Arc<AtomicBool>,
    rebind: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind front");
        let addr = front.local_addr().expect("addr").to_string();
        let silent = Arc::new(AtomicBool::new(false));
        let rebind = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (silent, rebind) = (Arc::clone(&silent), Arc::clone(&rebind));
            async move {
                let mut back = UdpSocket::bind("127.0.0.1:0").await.expect("bind back");
                let mut client: Option<SocketAddr> = None;
                let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
                loop {
                    tokio::select! {
                        r = front.recv_from(&mut up) => {
                            let Ok((n, from)) = r else { return };
                            client = Some(from);
                            if !silent.load(Ordering::Relaxed) {
                                let _ = back.send_to(&up[..n], server).await;
                            }
                        }
                        r = back.recv_from(&mut down) => {
                            let Ok((n, _)) = r else { return };
                            if let (Some(to), false) = (client, silent.load(Ordering::Relaxed)) {
                                let _ = front.send_to(&down[..n], to).await;
                            }
                        }
                        () = rebind.notified() => {
                            back = UdpSocket::bind("127.0.0.1:0").await.expect("rebind");
                            tracing::info!(new = %back.local_addr().expect("addr"), "relay moved to a new port");
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            silent,
            rebind,
            task,
        }
    }

    fn silence(&self, on: bool) {
        self.silent.store(on, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `cond` holds, or fails after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `viewer`'s events until one puts `friend` at latitude `lat`; fails after 15 s.
async fn sees_at(viewer: &mut Viewer, friend: u64, lat: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, viewer.next())
            .await
            .unwrap_or_else(|_| panic!("user {} never saw {friend} at {lat}", viewer.user));
        if let Event::FriendMoved(f) | Event::FriendEntered(f) = &e {
            if f.id == friend && (f.at.lat - lat).abs() < 1e-9 {
                return;
            }
        }
    }
}

/// `publisher` at `A` and `n` viewers who are all its friends, located next to it, each having
/// seen it there.
async fn crowd(node: &TestNode, publisher: u64, n: u64) -> (Viewer, Vec<Viewer>) {
    let mut viewers = Vec::new();
    for i in 0..n {
        let v = uid((i % 4) as usize, 1_000 + i);
        node.befriend(publisher, v).await;
        let c = node.client(v).await;
        c.at(A.0 + 0.001, A.1).await;
        viewers.push(c);
    }
    let p = node.client(publisher).await;
    p.at(A.0, A.1).await;
    for v in &mut viewers {
        sees_at(v, publisher, A.0).await;
    }
    (p, viewers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_call_carries_the_pushes_of_many_sessions() {
    let node = TestNode::start().await;
    let p = uid(0, 1);
    let (publisher, mut viewers) = crowd(&node, p, 40).await;
    let (calls, messages) = node.metrics.send_calls();
    for step in 1..=5 {
        let lat = A.0 + f64::from(step) * 1e-4;
        publisher.at(lat, A.1).await;
        for v in &mut viewers {
            sees_at(v, p, lat).await;
        }
    }
    let (calls, messages) = (
        node.metrics.send_calls().0 - calls,
        node.metrics.send_calls().1 - messages,
    );
    tracing::info!(calls, messages, "5 moves to 40 viewers");
    // Each move makes 40 pushes (and their acknowledgements come back in a burst): on quinn's
    // tasks every datagram is a system call of its own.
    assert!(calls > 0, "no sendmmsg call: the batched driver is not serving");
    assert!(
        messages as f64 >= 2.0 * calls as f64,
        "{messages} messages in {calls} sendmmsg calls: the driver did not batch across sessions"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_mid_batch_leaves_the_others_whole() {
    let node = TestNode::start().await;
    let p = uid(0, 2);
    let (publisher, mut viewers) = crowd(&node, p, 12).await;
    // Three rounds: a viewer leaves at the very moment a move fans out to everyone.
    for round in 1..=3 {
        let leaving = viewers.remove(0);
        let lat = A.0 + f64::from(round) * 1e-4;
        let (_, ()) = tokio::join!(publisher.at(lat, A.1), leaving.client.close());
        for v in &mut viewers {
            sees_at(v, p, lat).await;
        }
        // The node ended the closed session and no other: the viewers left and the publisher.
        let want = viewers.len() as u64 + 1;
        until("the closed session ended", Duration::from_secs(10), || {
            node.metrics.sessions() == want
        })
        .await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_acknowledging_gets_everything_when_it_answers_again() {
    let node = TestNode::start().await;
    let (p, quiet, steady) = (uid(0, 3), uid(1, 3), uid(2, 3));
    node.befriend(p, quiet).await;
    node.befriend(p, steady).await;
    let relay = Relay::start(node.addr.parse().expect("addr")).await;
    let mut q = node.client_at(&relay.addr, quiet).await;
    q.at(A.0 + 0.001, A.1).await;
    let mut s = node.client(steady).await;
    s.at(A.0 - 0.001, A.1).await;
    let publisher = node.client(p).await;
    publisher.at(A.0, A.1).await;
    sees_at(&mut q, p, A.0).await;
    sees_at(&mut s, p, A.0).await;

    // The quiet client's packets (and the node's to it) are lost from here on: the node keeps
    // sending and retransmitting to it, on timers, while the steady client is served as usual.
    relay.silence(true);
    let lats: Vec<f64> = (1..=5).map(|i| A.0 + f64::from(i) * 1e-4).collect();
    for &lat in &lats {
        let sent = Instant::now();
        publisher.at(lat, A.1).await;
        sees_at(&mut s, p, lat).await;
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "a silent client slowed another's push to {:?}",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.silence(false);
    // Every position reaches it, in order, on the connection it had.
    for &lat in &lats {
        sees_at(&mut q, p, lat).await;
    }
    assert_eq!(
        q.client.link_stats().connections,
        1,
        "the client had to reconnect"
    );
    node.stop().await;
}

/// A congested client (its packets lost) holds at most a congestion window of events at the
/// node's QUIC layer; the rest waits in its session's queue, where a hide acknowledged
/// meanwhile still reaches them: when the client answers again it gets the hide, not the
/// positions queued before it. (With the connection allowed to buffer 512 KiB unacknowledged,
/// every one of those positions arrived after the hide's acknowledgement.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congested_clients_queued_positions_of_a_friend_who_hid_meanwhile_are_never_sent() {
    // The publisher sends its positions back to back: no request rate limit.
    let node = TestNode::start_unthrottled().await;
    let (p, quiet) = (uid(0, 5), uid(1, 5));
    node.befriend(p, quiet).await;
    let relay = Relay::start(node.addr.parse().expect("addr")).await;
    let mut q = node.client_at(&relay.addr, quiet).await;
    q.at(A.0 + 0.001, A.1).await;
    let publisher = node.client(p).await;
    publisher.at(A.0, A.1).await;
    sees_at(&mut q, p, A.0).await;

    relay.silence(true);
    // Far more positions than a congestion window holds (each event is ~50 bytes).
    let lats: Vec<f64> = (1..=2_000).map(|i| A.0 + f64::from(i) * 1e-6).collect();
    for &lat in &lats {
        publisher.at(lat, A.1).await;
    }
    publisher.client.hide(quiet).await.expect("hide acknowledged");
    relay.silence(false);
    // Everything the client gets from here on: what the node had let into the connection
    // before the hide, then the hide.
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, q.next())
            .await
            .expect("the hide never reached the client");
        match e {
            Event::FriendGone { id, .. } if id == p => break,
            Event::FriendMoved(f) | Event::FriendEntered(f) if f.id == p => after.push(f.at.lat),
            _ => {}
        }
    }
    tracing::info!(
        after = after.len(),
        sent = lats.len(),
        "positions that reached the congested client after the hide"
    );
    let last = *lats.last().expect("positions");
    assert!(
        !after.iter().any(|lat| (lat - last).abs() < 1e-12),
        "the newest position, queued before the hide, reached the client after it ({} positions did)",
        after.len()
    );
    // A congestion window (quinn's first is 14,720 bytes; it shrinks under loss) of ~48-byte
    // events: about 300.
    assert!(
        after.len() < lats.len() / 4,
        "{} of {} positions sent before the hide reached the client after it",
        after.len(),
        lats.len()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_keeps_its_connection() {
    let node = TestNode::start().await;
    let (p, v) = (uid(0, 4), uid(1, 4));
    node.befriend(p, v).await;
    let relay = Relay::start(node.addr.parse().expect("addr")).await;
    let mut viewer = node.client_at(&relay.addr, v).await;
    viewer.at(A.0 + 0.001, A.1).await;
    let publisher = node.client(p).await;
    publisher.at(A.0, A.1).await;
    sees_at(&mut viewer, p, A.0).await;
    for round in 1..=2 {
        relay.rebind.notify_one();
        // The client speaks first from its new address (its next update); the node answers
        // there, and pushes follow it.
        viewer.at(A.0 + 0.001 * f64::from(round + 1), A.1).await;
        let lat = A.0 + f64::from(round) * 1e-4;
        publisher.at(lat, A.1).await;
        sees_at(&mut viewer, p, lat).await;
    }
    assert_eq!(
        viewer.client.link_stats().connections,
        1,
        "the address change cost the client its connection"
    );
    node.stop().await;
}
