//! The SDK side of the cluster tests: a user's client with its events, and waiting with
//! deadlines.

use std::time::{Duration, Instant};

use nearby_client::proto::{Coord, Event};
use nearby_client::{Client, SdkEvent};
use nearby_index::geo::UserId;
use nearby_loadsim::cluster::{ClusterOptions, ProcessCluster};
use tokio::sync::mpsc;

/// One cluster test at a time. Each starts three to five node processes and clients on a
/// machine that may have two cores: two at once starve each other's heartbeats and turn a
/// test of timing (elections, hibernation, operations under load) into a test of the
/// scheduler. Every test takes this first and holds it to the end.
pub(crate) async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A cluster of `n` processes with `groups` groups in a fresh temporary directory (kept alive
/// with the returned guard).
pub(crate) async fn cluster(n: u8, groups: u64) -> (ProcessCluster, tempfile::TempDir) {
    start(n, groups, false).await
}

/// Like [`cluster`], with every node following its fault file: the test may cut nodes off from
/// each other ([`ProcessCluster::cut_off`]).
pub(crate) async fn cluster_with_cuts(n: u8, groups: u64) -> (ProcessCluster, tempfile::TempDir) {
    start(n, groups, true).await
}

async fn start(n: u8, groups: u64, cuts: bool) -> (ProcessCluster, tempfile::TempDir) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::TempDir::new().expect("tmp");
    let mut opts = ClusterOptions::new(dir.path(), n, groups).expect("options");
    opts.delay_files = cuts;
    let c = ProcessCluster::start(opts).await.expect("cluster starts");
    (c, dir)
}

/// Retries `call` while the cluster is between leaders, for up to 20 s; panics naming `what`
/// on any other error.
pub(crate) async fn retrying<T, F: std::future::Future<Output = Result<T, nearby_client::ClientError>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `within` passes; panics naming `what`.
pub(crate) async fn wait_until(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    nearby_loadsim::cluster::wait_until(what, within, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `user`'s client through the nodes `via`, with its events.
pub(crate) async fn viewer_via(c: &ProcessCluster, user: UserId, via: &[u8]) -> Viewer {
    let client = c
        .client_via(user, via)
        .await
        .unwrap_or_else(|e| panic!("user {user} cannot connect via {via:?}: {e}"));
    let events = client.events().expect("events");
    Viewer { user, client, events }
}

/// `user`'s client through any node.
pub(crate) async fn viewer(c: &ProcessCluster, user: UserId) -> Viewer {
    let all: Vec<u8> = (1..=c.size()).collect();
    viewer_via(c, user, &all).await
}

/// One user's client and its events.
pub(crate) struct Viewer {
    pub(crate) user: UserId,
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<SdkEvent>,
}

impl Viewer {
    /// Sends a location, retrying while the cluster is between leaders.
    pub(crate) async fn at(&self, lat: f64, lon: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.client.update_location(Coord { lat, lon }).await {
                Ok(_) => return,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("user {}: update failed: {e}", self.user),
            }
        }
    }

    /// The next product event within `within` (connection notices are skipped).
    pub(crate) async fn next_within(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(SdkEvent::Event(e))) => return Some(e),
                Ok(Some(other)) => tracing::debug!(?other, "sdk notice"),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for an event about `friend` matching `want`, skipping others, within `within`.
    pub(crate) async fn expect_about(
        &mut self,
        friend: UserId,
        within: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) if e.friend() == Some(friend) && want(&e) => return e,
                Some(e) => seen.push(e),
                None => break,
            }
        }
        panic!(
            "user {}: no matching event about {friend} within {within:?}; saw {seen:?}",
            self.user
        );
    }
}

impl Viewer {
    /// Waits until `friend` is on the viewer's first page (after a failover the friend comes
    /// back with their next location).
    pub(crate) async fn sees(&self, friend: UserId, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(page) = self.client.list_nearby(None, None).await {
                if page.friends.iter().any(|f| f.id == friend) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "user {} does not see {friend} within {within:?}",
                self.user
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Makes `a` and `b` friends through their clients, retrying while leaders change.
pub(crate) async fn befriend(a: &Viewer, b: &Viewer) {
    for (x, y) in [(a, b), (b, a)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match x.client.add_friend(y.user).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{} add {}: {e}", x.user, y.user),
            }
        }
    }
}

/// A UDP relay between one client and a node that can drop everything both ways for a while
/// (a client whose link went dead): what the node sends meanwhile is lost, and it sends again
/// what the client has not acknowledged once the link is back — if its connection is still
/// open.
pub(crate) struct Link {
    /// The address the client dials.
    pub(crate) addr: String,
    dead: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Datagrams from the node dropped while the link was dead.
    dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A live link to `server`.
    pub(crate) async fn start(server: std::net::SocketAddr) -> Link {
        use std::sync::atomic::Ordering;
        use tokio::net::UdpSocket;
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind front");
        let addr = front.local_addr().expect("addr").to_string();
        let dead = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (d, n) = (std::sync::Arc::clone(&dead), std::sync::Arc::clone(&dropped));
        let task = tokio::spawn(async move {
            let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind back");
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((len, from)) = r else { return };
                        client = Some(from);
                        if !d.load(Ordering::Relaxed) {
                            let _ = back.send_to(&up[..len], server).await;
                        }
                    }
                    r = back.recv_from(&mut down) => {
                        let Ok((len, _)) = r else { return };
                        if d.load(Ordering::Relaxed) {
                            n.fetch_add(1, Ordering::Relaxed);
                        } else if let Some(to) = client {
                            let _ = front.send_to(&down[..len], to).await;
                        }
                    }
                }
            }
        });
        Link {
            addr,
            dead,
            dropped,
            task,
        }
    }

    /// Drops everything both ways (`true`) or forwards again.
    pub(crate) fn set_dead(&self, dead: bool) {
        self.dead.store(dead, std::sync::atomic::Ordering::Relaxed);
    }

    /// Datagrams from the node dropped so far.
    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}
