//! The oracle against toy backends with known faults.

use nearby_loadsim::driver::Clients;

use crate::toy::{Mode, Toy};
use crate::util::{drive, small_world, Served, SERIAL};

/// 60 online users of 200 in one city, each sending every 3 s for 7 s: a few hundred updates and
/// about a thousand expected deliveries, and no update rescued by the sender's next one within
/// the 2 s deadline.
const USERS: usize = 200;
const ONLINE: f64 = 0.3;
const RATE: f64 = 20.0;
const SECS: u64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_pushes_to_everyone_is_caught_leaking() {
    let _serial = SERIAL.lock().await;
    let world = small_world(11, USERS, ONLINE);
    // Either client driver records what arrived for the oracle to judge.
    for clients in [Clients::Sdk, Clients::Batched] {
        let served = Served::start(Toy::new(Mode::Leaky, &world.seed()));
        let (report, verdict) = drive(&world, &served.addr, &served.ca_pem, RATE, SECS, None, clients).await;
        served.stop().await;
        assert!(report.total.leaks > 100, "{clients:?}: {}", report.table());
        assert!(!report.no_leaks());
        assert!(verdict
            .leak_samples
            .iter()
            .any(|l| matches!(l.reason, nearby_loadsim::oracle::LeakReason::NotAllowed { .. })));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_drops_every_tenth_push_misses_ten_percent() {
    let _serial = SERIAL.lock().await;
    let world = small_world(12, USERS, ONLINE);
    let served = Served::start(Toy::new(Mode::Correct { drop_every: Some(10) }, &world.seed()));
    let (report, _) = drive(
        &world,
        &served.addr,
        &served.ca_pem,
        RATE,
        SECS,
        None,
        Clients::Sdk,
    )
    .await;
    served.stop().await;
    let t = report.total;
    assert_eq!(t.leaks, 0, "{}", report.table());
    assert!(t.expected > 300, "{}", report.table());
    assert!((0.07..=0.13).contains(&t.miss_rate), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_backend_has_no_leak_and_no_miss() {
    let _serial = SERIAL.lock().await;
    let world = small_world(13, USERS, ONLINE);
    for clients in [Clients::Sdk, Clients::Batched] {
        let served = Served::start(Toy::new(Mode::Correct { drop_every: None }, &world.seed()));
        let (report, _) = drive(&world, &served.addr, &served.ca_pem, RATE, SECS, None, clients).await;
        served.stop().await;
        let t = report.total;
        assert!(t.expected > 300, "{clients:?}: {}", report.table());
        assert_eq!((t.leaks, t.missed), (0, 0), "{clients:?}: {}", report.table());
        let step = &report.steps[0];
        assert!(
            step.updates_per_s > RATE * 0.8 && step.pushes > 0,
            "{clients:?}: {}",
            report.table()
        );
        assert!(step.latency.count > 0 && report.connect.startup.count > 0);
        assert!(step.server.is_some(), "own process stats are read");
        assert!(report.errors.is_empty(), "{clients:?}: {}", report.table());
    }
}
