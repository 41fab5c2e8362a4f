//! The batched driver's defences against floods of connections (`service::driver::guard`), over
//! real QUIC: a QUIC Retry that a client follows without noticing, and a per-address limit on
//! connections that have not said `Hello` that frees its slots as they go.

use std::time::Duration;

use nearby_node::service::AbuseLimits;

use crate::bad_input::raw_endpoint;
use crate::util::{uid, until_ok, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_handshake_flood_clients_validate_their_address_with_a_retry() {
    // A threshold of 0: every new connection counts as during a flood.
    let node = TestNode::start_guarded(
        AbuseLimits {
            retry_above: 0,
            ..AbuseLimits::default()
        },
        Duration::from_secs(10),
    )
    .await;
    let a = node.client(uid(0, 1)).await;
    a.at(52.52, 13.405).await;
    a.client.ping().await.expect("served after the retry");
    let (retries, refused) = node.metrics.handshake_defences();
    assert!(
        retries >= 1,
        "the connection was asked to validate its address first"
    );
    assert_eq!(refused, 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_with_too_many_silent_handshakes_is_refused_until_they_go() {
    let node = TestNode::start_guarded(
        AbuseLimits {
            handshakes_per_address: 2,
            ..AbuseLimits::default()
        },
        Duration::from_secs(10),
    )
    .await;
    // Clients past Hello no longer count as handshakes: four of them from this one address.
    let mut clients = Vec::new();
    for n in 1..=4 {
        clients.push(node.client(uid(0, n)).await);
    }
    let addr = node.addr.parse().expect("addr");
    let endpoint = raw_endpoint(&node.ca_pem);
    let connect = || async { endpoint.connect(addr, "localhost").expect("connect").await };
    // Two connections that never say Hello hold the address's two handshake slots.
    let first = connect().await.expect("first silent handshake");
    let second = connect().await.expect("second silent handshake");
    match connect().await {
        Err(quinn::ConnectionError::ConnectionClosed(c)) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED, "{c}");
        }
        other => panic!("a third silent handshake from the address must be refused, got {other:?}"),
    }
    assert_eq!(node.metrics.handshake_defences(), (0, 1));
    for c in &clients {
        c.client
            .ping()
            .await
            .expect("the clients inside are not disturbed");
    }

    // One goes: its slot is free again once the node has seen the close.
    first.close(0u32.into(), b"bye");
    let third = until_ok("the slot never came back", Duration::from_secs(5), connect).await;
    third.close(0u32.into(), b"bye");
    second.close(0u32.into(), b"bye");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed_in_time_and_frees_its_slot() {
    let node = TestNode::start_guarded(
        AbuseLimits {
            handshakes_per_address: 1,
            ..AbuseLimits::default()
        },
        Duration::from_millis(300),
    )
    .await;
    let endpoint = raw_endpoint(&node.ca_pem);
    let silent = endpoint
        .connect(node.addr.parse().expect("addr"), "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let why = tokio::time::timeout(Duration::from_secs(5), silent.closed())
        .await
        .expect("the node closes a connection that never says Hello");
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(1), "{c}");
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    // Its handshake slot (the address's only one) is free again.
    let cfg = nearby_client::ClientConfig::new(
        node.addr.clone(),
        node.ca_pem.clone(),
        uid(0, 1),
        node.token(uid(0, 1)),
    );
    let c = until_ok("the slot never came back", Duration::from_secs(5), || {
        nearby_client::Client::connect(cfg.clone())
    })
    .await;
    c.ping().await.expect("served");
    node.stop().await;
}
