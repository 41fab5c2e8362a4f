//! A node started in-process for a test, clients for it, and waiting with deadlines.

use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{Coord, Event};
use nearby_client::{Client, ClientConfig, SdkEvent};
use nearby_index::geo::{Millis, UserId};
use nearby_node::api::ServiceConfig;
use nearby_node::auth::{Claims, TokenSigner};
use nearby_node::clock::{Clock, ManualClock};
use nearby_node::cluster::Bootstrap;
use nearby_node::gateway::Gateway;
use nearby_node::node::{Node, NodeOptions};
use nearby_node::service::tls::ServerTls;
use nearby_raft::meta::initial_ranges;
use nearby_raft::transport::ClusterCa;
use tokio::sync::{mpsc, oneshot};

pub(crate) const GROUPS: u64 = 4;

/// User `n` of group `g` (0-based): ids spread over the groups, so forwarding crosses groups.
pub(crate) fn uid(g: usize, n: u64) -> UserId {
    initial_ranges(GROUPS)[g].1.start + n
}

/// Tries `attempt` every 50 ms until it succeeds, and returns what it gave; fails after `within`
/// with `what` and the last error.
pub(crate) async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{what}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How a test node is set up: what each `start_*` changes from the defaults.
struct Setup {
    seed: Option<nearby_raft::seed::Seed>,
    service: ServiceConfig,
    min_update_interval: Duration,
    /// Requests per second a session may send (`None`: the node's default).
    requests_per_s: Option<u32>,
    data: Option<std::path::PathBuf>,
    wal: nearby_raft::wal::WalOptions,
    abuse: nearby_node::service::AbuseLimits,
    hello_timeout: Duration,
    /// Dev mode: the node signs tokens for `DevLogin` (production nodes do not).
    dev_login: bool,
    /// Runs with no other test's node in the process (see [`Share`]).
    alone: bool,
}

/// The client-facing settings most tests run with: no load shedding (these tests check
/// behaviour, and a loaded CI machine must not make a periodic update come back
/// `rate_limited`; the shedding test turns it on), strangers' pseudonyms on.
fn tests_service() -> ServiceConfig {
    let mut service = ServiceConfig {
        shed: None,
        ..ServiceConfig::default()
    };
    service.presence.pseudonyms = Some(nearby_node::strangers::Pseudonyms::new(b"e2e cluster key"));
    service
}

/// The tests of this binary share one process, so a test that measures the process (its
/// memory) runs alone: each node holds a read guard of this lock while it lives, a measuring
/// test's node the write guard. No test starts two nodes at once, so the lock's fairness
/// cannot deadlock.
static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What a [`TestNode`] holds of [`PROCESS`].
enum Share {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl Setup {
    fn new(service: ServiceConfig) -> Setup {
        Setup {
            seed: None,
            service,
            min_update_interval: Duration::ZERO,
            requests_per_s: None,
            data: None,
            wal: Default::default(),
            abuse: Default::default(),
            hello_timeout: Duration::from_secs(10),
            dev_login: true,
            alone: false,
        }
    }
}

pub(crate) struct TestNode {
    pub(crate) addr: String,
    pub(crate) ca_pem: String,
    pub(crate) signer: Arc<TokenSigner>,
    pub(crate) clock: ManualClock,
    pub(crate) core: Arc<Gateway>,
    pub(crate) metrics: Arc<nearby_node::metrics::ServiceMetrics>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    data: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _share: Share,
}

impl TestNode {
    pub(crate) async fn start() -> TestNode {
        Self::start_with(None).await
    }

    /// Like [`TestNode::start`], with no other test's node in the process while it lives: for
    /// a test that measures the process.
    pub(crate) async fn start_alone() -> TestNode {
        let mut setup = Setup::new(tests_service());
        setup.alone = true;
        Self::start_in(setup).await
    }

    /// Starts a node that first imports `seed`.
    pub(crate) async fn start_with(seed: Option<nearby_raft::seed::Seed>) -> TestNode {
        Self::start_configured(seed, tests_service()).await
    }

    /// Starts a node with client-facing settings `service`, importing `seed` first.
    pub(crate) async fn start_configured(
        seed: Option<nearby_raft::seed::Seed>,
        service: ServiceConfig,
    ) -> TestNode {
        // Tests send a user's updates back to back: no minimum interval (its own test sets it).
        Self::start_limited(seed, service, Duration::ZERO).await
    }

    /// Starts a node whose sessions' updates must be `min_update_interval` apart.
    pub(crate) async fn start_limited(
        seed: Option<nearby_raft::seed::Seed>,
        service: ServiceConfig,
        min_update_interval: Duration,
    ) -> TestNode {
        let mut setup = Setup::new(service);
        setup.seed = seed;
        setup.min_update_interval = min_update_interval;
        Self::start_in(setup).await
    }

    /// Starts a node whose sessions may send requests back to back, as fast as they like.
    pub(crate) async fn start_unthrottled() -> TestNode {
        let mut setup = Setup::new(tests_service());
        setup.requests_per_s = Some(1_000_000);
        Self::start_in(setup).await
    }

    /// Starts a node (shedding off) that admits connections within `abuse` and gives each
    /// `hello_timeout` to say `Hello`.
    pub(crate) async fn start_guarded(
        abuse: nearby_node::service::AbuseLimits,
        hello_timeout: Duration,
    ) -> TestNode {
        let service = ServiceConfig {
            shed: None,
            ..ServiceConfig::default()
        };
        let mut setup = Setup::new(service);
        setup.abuse = abuse;
        setup.hello_timeout = hello_timeout;
        Self::start_in(setup).await
    }

    /// Starts a node as in production: no dev login (tokens come from the test's signer).
    pub(crate) async fn start_production() -> TestNode {
        let mut setup = Setup::new(ServiceConfig {
            shed: None,
            ..ServiceConfig::default()
        });
        setup.dev_login = false;
        Self::start_in(setup).await
    }

    /// Starts a node (shedding off) keeping its data in `data`, its log set up by `wal`.
    pub(crate) async fn start_on(data: std::path::PathBuf, wal: nearby_raft::wal::WalOptions) -> TestNode {
        let service = ServiceConfig {
            shed: None,
            ..ServiceConfig::default()
        };
        let mut setup = Setup::new(service);
        setup.data = Some(data);
        setup.wal = wal;
        Self::start_in(setup).await
    }

    async fn start_in(setup: Setup) -> TestNode {
        let Setup {
            seed,
            service,
            min_update_interval,
            requests_per_s,
            data,
            wal,
            abuse,
            hello_timeout,
            dev_login,
            alone,
        } = setup;
        let share = if alone {
            Share::Alone(PROCESS.write().await)
        } else {
            Share::Shared(PROCESS.read().await)
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::TempDir::new().expect("tmp");
        let data = data.unwrap_or_else(|| dir.path().to_path_buf());
        let tls = ServerTls::self_signed().expect("tls");
        let ca_pem = tls.chain_pem.clone();
        let signer = Arc::new(TokenSigner::generate().expect("key"));
        let clock = ManualClock::new(Millis(1_700_000_000_000));
        let mut opts = NodeOptions::new(
            1,
            data.clone(),
            Bootstrap::Init { groups: GROUPS },
            tls,
            ClusterCa::generate("t")
                .expect("ca")
                .issue_node(1)
                .expect("node tls"),
            signer.verifier(),
            Arc::new(clock.clone()),
        );
        if dev_login {
            opts.dev_signer = Some(Arc::clone(&signer));
        }
        opts.service = service;
        opts.min_update_interval = min_update_interval;
        if let Some(r) = requests_per_s {
            opts.requests_per_s = r;
        }
        opts.wal = wal;
        opts.abuse = abuse;
        opts.hello_timeout = hello_timeout;
        let node = Node::start(opts).await.expect("node starts");
        if let Some(seed) = seed {
            node.import(&seed).await.expect("import");
        }
        let addr = node.client_addr().to_string();
        let core = Arc::clone(node.gateway());
        let metrics = Arc::clone(node.metrics());
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(node.run(async {
            let _ = rx.await;
        }));
        TestNode {
            addr,
            ca_pem,
            signer,
            clock,
            core,
            metrics,
            stop: Some(tx),
            done: Some(done),
            data,
            _dir: dir,
            _share: share,
        }
    }

    /// The node's data directory.
    pub(crate) fn data(&self) -> &std::path::Path {
        &self.data
    }

    pub(crate) fn token(&self, user: UserId) -> String {
        self.signer.sign(Claims {
            user,
            expires_at: self.clock.now().saturating_add(Duration::from_secs(3600)),
        })
    }

    pub(crate) async fn client(&self, user: UserId) -> Viewer {
        self.client_at(&self.addr, user).await
    }

    /// A client that reaches the node at `addr` (a relay in front of it, say).
    pub(crate) async fn client_at(&self, addr: &str, user: UserId) -> Viewer {
        let cfg = ClientConfig::new(addr.to_string(), self.ca_pem.clone(), user, self.token(user));
        let client = Client::connect(cfg).await.expect("connect");
        let events = client.events().expect("events");
        Viewer { user, client, events }
    }

    /// Makes `a` and `b` friends (both sides committed).
    pub(crate) async fn befriend(&self, a: UserId, b: UserId) {
        for u in [a, b] {
            self.core.ensure_registered(u).await.expect("register");
        }
        for (x, y) in [(a, b), (b, a)] {
            self.core
                .commit(nearby_raft::Command::AddFriend { from: x, to: y })
                .await
                .expect("add friend");
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .expect("node stops in time")
                .expect("node task");
        }
    }
}

/// One user's client and its events.
pub(crate) struct Viewer {
    pub(crate) user: UserId,
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<SdkEvent>,
}

impl Viewer {
    pub(crate) async fn at(&self, lat: f64, lon: f64) {
        self.client
            .update_location(Coord { lat, lon })
            .await
            .expect("update location");
    }

    /// The next product event (connection notices are skipped), within a deadline.
    pub(crate) async fn next(&mut self) -> Event {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.recv()).await {
                Ok(Some(SdkEvent::Event(e))) => return e,
                Ok(Some(other)) => tracing::debug!(?other, "sdk notice"),
                Ok(None) => panic!("user {}: event stream ended", self.user),
                Err(_) => panic!("user {}: no event within 10 s", self.user),
            }
        }
    }

    /// Asserts that the next event is about `friend`, returning it: everything before it would
    /// have arrived first (events of one session are delivered in order).
    pub(crate) async fn next_about(&mut self, friend: UserId) -> Event {
        let e = self.next().await;
        assert_eq!(
            e.friend(),
            Some(friend),
            "user {}: unexpected event {e:?}",
            self.user
        );
        e
    }
}
