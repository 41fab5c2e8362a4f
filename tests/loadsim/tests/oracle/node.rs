//! The oracle against the real nearby node, started in-process with the world imported.

use std::sync::Arc;

use nearby_loadsim::driver::Clients;
use nearby_loadsim::{World, WorldConfig};
use nearby_node::api::ServiceConfig;
use nearby_node::auth::TokenSigner;
use nearby_node::clock::SystemClock;
use nearby_node::cluster::Bootstrap;
use nearby_node::node::{Node, NodeOptions};
use nearby_node::service::tls::ServerTls;
use nearby_raft::transport::ClusterCa;
use tokio::sync::oneshot;

use crate::util::{drive, SERIAL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_node_leaks_nothing_and_misses_nothing() {
    let _serial = SERIAL.lock().await;
    // 300 users, 30 online, some with sharing off, in ghost mode or hiding from a friend, and a
    // third of them discoverable or looking for strangers, so a leak would show.
    // The first seed whose world has, among those hidden from everyone, users who are also
    // discoverable (so a node showing them to strangers would be caught).
    let world = (5..200)
        .map(|seed| {
            World::generate(WorldConfig {
                seed,
                users: 300,
                cities: 2,
                online: 0.1,
                sharing_off: 0.1,
                hidden: 0.1,
                discoverable: 0.35,
                strangers: 0.35,
                ..WorldConfig::default()
            })
            .expect("world")
        })
        .find(|w| {
            w.sharing_off()
                .iter()
                .filter(|u| w.discoverable().binary_search(u).is_ok())
                .count()
                >= 2
        })
        .expect("a world with hidden discoverable users");
    // At least two hidden from everyone: one by sharing off, one by ghost mode (the driver
    // alternates); strangers to see and to look.
    assert!(world.sharing_off().len() >= 2 && !world.hidden().is_empty());
    assert!(world.discoverable().len() >= 5 && world.listeners().len() >= 5);
    let pseudonym_key = b"the cluster's pseudonym key".to_vec();
    let node = Started::new(&world, &pseudonym_key).await;
    let (addr, ca_pem) = (node.addr.clone(), node.ca_pem.clone());

    // Every online user sends once a second (30 s of simulated time each): 5 s of load.
    let (report, _) = drive(
        &world,
        &addr,
        &ca_pem,
        30.0,
        5,
        Some(&pseudonym_key),
        Clients::Sdk,
    )
    .await;
    // The oracle maps strangers back with the key: with another key, every stranger the
    // viewers see is someone it cannot name — a leak (so the stranger events were judged).
    let (wrong, _) = drive(
        &world,
        &addr,
        &ca_pem,
        30.0,
        2,
        Some(b"another key"),
        Clients::Sdk,
    )
    .await;
    node.stop().await;
    // The batched clients make the same requests: the same settings, strangers, judgement. A
    // fresh node, whose users hold no location from the runs before (a position the run did
    // not send is one the oracle cannot place).
    let node = Started::new(&world, &pseudonym_key).await;
    let (batched, _) = drive(
        &world,
        &node.addr,
        &node.ca_pem,
        30.0,
        5,
        Some(&pseudonym_key),
        Clients::Batched,
    )
    .await;
    node.stop().await;

    let t = report.total;
    assert_eq!(t.leaks, 0, "{}", report.table());
    assert!(
        report.strangers.0 >= 10,
        "too few stranger events to judge: {}",
        report.table()
    );
    assert_eq!(
        report.strangers.1,
        0,
        "friends shown as strangers: {}",
        report.table()
    );
    assert!(
        wrong
            .leak_samples
            .iter()
            .any(|l| l.reason == nearby_loadsim::oracle::LeakReason::UnknownSender),
        "{}",
        wrong.table()
    );
    assert!(t.expected > 100, "{}", report.table());
    assert!(t.miss_rate < 0.001, "{}", report.table());
    assert!(report.errors.is_empty(), "{}", report.table());
    assert_eq!(report.connect.sessions, world.online().len());

    let b = batched.total;
    assert_eq!(b.leaks, 0, "{}", batched.table());
    assert!(batched.strangers.0 >= 10, "{}", batched.table());
    assert!(b.expected > 100 && b.miss_rate < 0.001, "{}", batched.table());
    assert!(batched.errors.is_empty(), "{}", batched.table());
    assert_eq!(batched.connect.sessions, world.online().len());
}

/// A node of its own, with the world imported, running until [`Started::stop`].
struct Started {
    addr: String,
    ca_pem: String,
    stop: oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Started {
    async fn new(world: &World, pseudonym_key: &[u8]) -> Started {
        let dir = tempfile::TempDir::new().expect("tmp");
        let tls = ServerTls::self_signed().expect("tls");
        let ca_pem = tls.chain_pem.clone();
        let signer = Arc::new(TokenSigner::generate().expect("key"));
        let mut opts = NodeOptions::new(
            1,
            dir.path().to_path_buf(),
            Bootstrap::Init { groups: 4 },
            tls,
            ClusterCa::generate("t")
                .expect("ca")
                .issue_node(1)
                .expect("node tls"),
            signer.verifier(),
            Arc::new(SystemClock),
        );
        opts.dev_signer = Some(signer);
        // The oracle is under test here, not load shedding.
        opts.service = ServiceConfig {
            shed: None,
            ..ServiceConfig::default()
        };
        // Nor the update interval: a participant's first timed update may follow its start closely.
        opts.min_update_interval = std::time::Duration::ZERO;
        opts.abuse = crate::util::one_address_for_everyone();
        opts.service.presence.pseudonyms = Some(nearby_node::strangers::Pseudonyms::new(pseudonym_key));
        let node = Node::start(opts).await.expect("node starts");
        node.import(&world.seed()).await.expect("import");
        let addr = node.client_addr().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(node.run(async {
            let _ = stopped.await;
        }));
        Started {
            addr,
            ca_pem,
            stop,
            running,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(15), self.running)
            .await
            .expect("node stops in time")
            .expect("node task");
    }
}
