//! A `redis-server` process per test (killed on drop), a baseline server over it, SDK clients,
//! and waiting for events with deadlines.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nearby_baseline::server::{Server, ServerOptions};
use nearby_baseline::BaselineConfig;
use nearby_client::proto::{Coord, Event};
use nearby_client::{Client, ClientConfig, SdkEvent};
use nearby_index::geo::UserId;
use nearby_raft::seed::Seed;
use tokio::sync::{mpsc, oneshot};

/// A `redis-server` on 127.0.0.1, without persistence, killed when dropped.
pub(crate) struct RedisProcess {
    child: Child,
    pub(crate) port: u16,
    _dir: tempfile::TempDir,
}

impl RedisProcess {
    pub(crate) fn start() -> RedisProcess {
        let dir = tempfile::TempDir::new().expect("tmp");
        // A free port: bind, read, release. Another process could take it in between; the
        // readiness check below would then fail loudly rather than talk to a foreign Redis,
        // because it also checks that our child is alive.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH: the baseline's tests need a real Redis. Install it with \
                 `apt-get update && apt-get install -y redis-server` (CI installs it the same way)."
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let mut redis = RedisProcess {
            child,
            port,
            _dir: dir,
        };
        redis.wait_ready();
        redis
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "redis-server exited at start ({status}); port {} taken?",
                    self.port
                );
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                let ok = s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok();
                if ok && &buf == b"+PONG\r\n" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Users of the tiny test world: ann, bob, cat, dan, eve, fay.
pub(crate) const ANN: UserId = 1;
pub(crate) const BOB: UserId = 2;
pub(crate) const CAT: UserId = 3;
pub(crate) const DAN: UserId = 4;
pub(crate) const EVE: UserId = 5;

/// ann–bob, ann–cat, dan–bob are friends; eve has no friends.
pub(crate) fn seed() -> Seed {
    Seed {
        users: ["ann", "bob", "cat", "dan", "eve", "fay"]
            .iter()
            .enumerate()
            .map(|(i, n)| (i as UserId + 1, (*n).to_string()))
            .collect(),
        friendships: vec![(ANN, BOB), (ANN, CAT), (DAN, BOB)],
        follows: vec![],
    }
}

/// A baseline server over its own Redis, with the seed imported.
pub(crate) struct TestServer {
    pub(crate) addr: String,
    pub(crate) ca_pem: String,
    pub(crate) home: tempfile::TempDir,
    pub(crate) redis: RedisProcess,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub(crate) async fn start(ttl: Duration) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let redis = RedisProcess::start();
        let home = tempfile::TempDir::new().expect("tmp");
        let seed_path = home.path().join("seed.bin");
        seed().write(&seed_path).expect("seed");
        let config = BaselineConfig {
            ttl,
            pubsub_connections: 4,
            ..BaselineConfig::default()
        };
        let server = Server::start(ServerOptions {
            redis: redis.addr(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            home: home.path().to_path_buf(),
            import: Some(seed_path),
            config,
            // Behaviour under test, not load: a loaded CI machine must not shed an update.
            shed: false,
            // Tests send a user's updates back to back.
            min_update_interval: Some(Duration::ZERO),
        })
        .await
        .expect("baseline starts");
        let addr = server.local_addr().to_string();
        let ca_pem = server.ca_pem().to_string();
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            ca_pem,
            home,
            redis,
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// A client of `user`, logged in with DevLogin.
    pub(crate) async fn client(&self, user: UserId) -> Viewer {
        let (token, _) = Client::dev_login(std::slice::from_ref(&self.addr), "localhost", &self.ca_pem, user)
            .await
            .expect("dev login");
        let cfg = ClientConfig::new(self.addr.clone(), self.ca_pem.clone(), user, token);
        let client = Client::connect(cfg).await.expect("connect");
        let events = client.events().expect("events");
        Viewer { user, client, events }
    }

    /// One Redis command's reply, as text (for checking what the baseline stored).
    pub(crate) async fn redis_get(&self, key: &str) -> Option<String> {
        let client = redis::Client::open(format!("redis://{}", self.redis.addr())).expect("url");
        let mut c = client.get_multiplexed_async_connection().await.expect("redis");
        redis::cmd("GET").arg(key).query_async(&mut c).await.expect("GET")
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .expect("server stops in time")
                .expect("server task");
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

    /// The next product event (connection notices are skipped), within `wait`.
    pub(crate) async fn next_within(&mut self, wait: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(SdkEvent::Event(e))) => return e,
                Ok(Some(other)) => tracing::debug!(?other, "sdk notice"),
                Ok(None) => panic!("user {}: event stream ended", self.user),
                Err(_) => panic!("user {}: no event within {wait:?}", self.user),
            }
        }
    }

    /// Asserts that the next event (within 10 s) is about `friend`: events of one session are
    /// delivered in order, so nothing about anyone else came first.
    pub(crate) async fn next_about(&mut self, friend: UserId) -> Event {
        let e = self.next_within(Duration::from_secs(10)).await;
        assert_eq!(
            e.friend(),
            Some(friend),
            "user {}: unexpected event {e:?}",
            self.user
        );
        e
    }

    /// Product events already received.
    pub(crate) fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            if let SdkEvent::Event(e) = e {
                out.push(e);
            }
        }
        out
    }
}
