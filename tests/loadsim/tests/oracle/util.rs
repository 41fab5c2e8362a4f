//! Serving a backend over real QUIC on 127.0.0.1:0, and running a world against it.

use std::sync::Arc;
use std::time::Duration;

use nearby_loadsim::cluster::SIMULATOR_ADDRESS_LIMIT;
use nearby_loadsim::driver::Clients;
use nearby_loadsim::{driver, DriverConfig, Report, Step, Verdict, World, WorldConfig};
use nearby_node::api::Backend;
use nearby_node::auth::TokenSigner;
use nearby_node::service::tls::ServerTls;
use nearby_node::service::{Service, ServiceOptions};
use tokio::sync::oneshot;

/// The suites share two cores: runs go one at a time so one run's load cannot make another's
/// deliveries late.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A backend served by the real client service.
pub(crate) struct Served {
    pub(crate) addr: String,
    pub(crate) ca_pem: String,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    pub(crate) fn start<B: Backend>(backend: Arc<B>) -> Served {
        let tls = ServerTls::self_signed().expect("tls");
        let ca_pem = tls.chain_pem.clone();
        let signer = Arc::new(TokenSigner::generate().expect("key"));
        let mut opts = ServiceOptions::new("127.0.0.1:0".parse().expect("addr"), tls, signer.verifier());
        opts.dev_signer = Some(signer);
        opts.shed = None; // the oracle is under test here, not load shedding
        opts.abuse = one_address_for_everyone();
        let service = Service::bind(opts, backend).expect("bind");
        let addr = service.local_addr().expect("addr").to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(service.run(async {
            let _ = rx.await;
        }));
        Served {
            addr,
            ca_pem,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .expect("service stops in time")
                .expect("service task");
        }
    }
}

/// Abuse limits for a simulator whose every user comes from 127.0.0.1, each with a dev login
/// and a session (see [`SIMULATOR_ADDRESS_LIMIT`]).
pub(crate) fn one_address_for_everyone() -> nearby_node::service::AbuseLimits {
    nearby_node::service::AbuseLimits::one_address(SIMULATOR_ADDRESS_LIMIT)
}

/// A small world: one city, so most friends are in range; no privacy settings unless asked.
pub(crate) fn small_world(seed: u64, users: usize, online: f64) -> World {
    World::generate(WorldConfig {
        seed,
        users,
        mean_degree: 30.0,
        cities: 1,
        online,
        sharing_off: 0.0,
        hidden: 0.0,
        follow_share: 0.05,
        ..WorldConfig::default()
    })
    .expect("world")
}

/// Runs `world` against `addr` at `rate` updates/s for `secs` with `clients`, then judges it;
/// with the cluster's `pseudonym_key`, strangers take part.
pub(crate) async fn drive(
    world: &World,
    addr: &str,
    ca_pem: &str,
    rate: f64,
    secs: u64,
    pseudonym_key: Option<&[u8]>,
    clients: Clients,
) -> (Report, Verdict) {
    let mut config = DriverConfig::new(
        addr,
        ca_pem,
        vec![Step {
            rate,
            duration: Duration::from_secs(secs),
        }],
    );
    config.progress = false;
    // Fewer connecting at once than the worlds' participants: places free up as sessions get
    // ready, and the next ones connect.
    config.connect_concurrency = 16;
    config.server_pids = vec![std::process::id()];
    config.pseudonym_key = pseudonym_key.map(<[u8]>::to_vec);
    config.clients = clients;
    let out = driver::run(world, config).await.expect("run");
    let (report, verdict) = Report::build(world, addr, &out);
    #[allow(clippy::print_stdout)] // the report, for `--nocapture` and failed runs
    {
        println!("{}", report.table());
        for (at, message) in out.error_messages.iter().take(5) {
            println!("  client error at {:.3} s: {message}", *at as f64 / 1e6);
        }
    }
    (report, verdict)
}
