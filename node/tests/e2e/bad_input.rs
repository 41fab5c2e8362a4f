//! Bad input over raw QUIC frames: each gets a clear error code, changes nothing, and the node
//! keeps serving other sessions.

use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{
    frame, Coord, ErrorCode, FrameBuffer, Request, RequestFrame, Response, ResponseFrame, PROTOCOL_VERSION,
};
use nearby_index::geo::{Millis, UserId};
use nearby_node::auth::{Claims, TokenSigner};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::util::{uid, TestNode};

/// A QUIC client endpoint that trusts `ca_pem` and speaks nearby's ALPN, nothing more.
pub(crate) fn raw_endpoint(ca_pem: &str) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![nearby_client::proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// A raw protocol connection: frames in, frames out, nothing checked on the client side.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: FrameBuffer,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    async fn connect(node: &TestNode) -> Raw {
        let endpoint = raw_endpoint(&node.ca_pem);
        let conn = endpoint
            .connect(node.addr.parse().expect("addr"), "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("bi");
        Raw {
            conn,
            send,
            recv,
            buf: FrameBuffer::new(),
            _endpoint: endpoint,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("write");
    }

    async fn request(&mut self, id: u64, request: Request) -> Response {
        let bytes = frame::to_bytes(&RequestFrame { id, request }).expect("encode");
        self.send_raw(&bytes).await;
        let r = self.response().await.expect("a response");
        assert_eq!(r.id, id);
        r.response
    }

    /// The next response, or `None` if the node closed the stream.
    async fn response(&mut self) -> Option<ResponseFrame> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = self
                .buf
                .next_frame::<ResponseFrame>()
                .expect("well-formed response")
            {
                return Some(f);
            }
            match tokio::time::timeout(Duration::from_secs(10), self.recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) => self.buf.extend(&chunk[..n]),
                Ok(Ok(None) | Err(_)) => return None,
                Err(_) => panic!("no response within 10 s"),
            }
        }
    }

    async fn hello(&mut self, user: UserId, token: String) -> Response {
        self.request(
            1,
            Request::Hello {
                version: PROTOCOL_VERSION,
                user,
                token,
                client: "raw test".into(),
            },
        )
        .await
    }
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Error(e) => {
            assert!(!e.message.is_empty(), "an error without a message");
            e.code
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_changes_nothing_and_others_are_served() {
    let node = TestNode::start().await;
    let (good, bad) = (uid(0, 10), uid(1, 10));
    node.befriend(good, uid(2, 10)).await;
    let witness = node.client(good).await;
    witness.at(52.52, 13.405).await;

    // A malformed frame: bad_frame, then the connection is closed.
    let mut r = Raw::connect(&node).await;
    r.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    let f = r.response().await.expect("an error frame");
    assert_eq!(code(&f.response), ErrorCode::BadFrame);
    assert!(
        r.response().await.is_none(),
        "the connection stays open after a bad frame"
    );
    assert!(tokio::time::timeout(Duration::from_secs(5), r.conn.closed())
        .await
        .is_ok());

    // An oversized length prefix: refused before any payload arrives.
    let mut r = Raw::connect(&node).await;
    r.send_raw(&u32::MAX.to_be_bytes()).await;
    let f = r.response().await.expect("an error frame");
    assert_eq!(code(&f.response), ErrorCode::FrameTooLarge);

    // Requests before Hello.
    let mut r = Raw::connect(&node).await;
    let resp = r
        .request(
            5,
            Request::ListNearby {
                cursor: None,
                page_size: None,
            },
        )
        .await;
    assert_eq!(code(&resp), ErrorCode::NotAuthenticated);

    // A forged token (another key), an expired token, a token for someone else, a bad version.
    let forged = TokenSigner::generate().expect("key").sign(Claims {
        user: bad,
        expires_at: Millis(u64::MAX),
    });
    assert_eq!(code(&r.hello(bad, forged).await), ErrorCode::TokenInvalid);
    let expired = node.signer.sign(Claims {
        user: bad,
        expires_at: Millis(1),
    });
    assert_eq!(code(&r.hello(bad, expired).await), ErrorCode::TokenExpired);
    assert_eq!(
        code(&r.hello(bad, "v1.garbage".into()).await),
        ErrorCode::TokenInvalid
    );
    // Acting for another user: the good user's token, claiming to be `bad`.
    assert_eq!(code(&r.hello(bad, node.token(good)).await), ErrorCode::Forbidden);
    let resp = r
        .request(
            2,
            Request::Hello {
                version: 99,
                user: bad,
                token: node.token(bad),
                client: "raw".into(),
            },
        )
        .await;
    assert_eq!(code(&resp), ErrorCode::UnsupportedVersion);
    assert!(
        !node.core.router().is_registered(bad).await.expect("routable"),
        "a refused hello registered the user"
    );

    // Authenticated now; out-of-range and NaN coordinates are refused and store nothing.
    assert!(matches!(
        r.hello(bad, node.token(bad)).await,
        Response::Welcome(_)
    ));
    for (lat, lon) in [(f64::NAN, 0.0), (0.0, f64::INFINITY), (90.5, 0.0), (0.0, -180.5)] {
        let resp = r
            .request(
                3,
                Request::UpdateLocation {
                    at: Coord { lat, lon },
                },
            )
            .await;
        assert_eq!(code(&resp), ErrorCode::InvalidCoordinates, "({lat}, {lon})");
    }
    assert!(
        !nearby_node::api::Backend::has_location(node.core.as_ref(), bad).await,
        "a refused location was stored"
    );
    let resp = r
        .request(
            4,
            Request::ListNearby {
                cursor: None,
                page_size: None,
            },
        )
        .await;
    assert_eq!(code(&resp), ErrorCode::NotStarted);
    // Dev login for someone else is a dev-only feature, not a way around Hello: it exists here
    // because the test node runs in dev mode. A second Hello is refused.
    assert_eq!(
        code(&r.hello(bad, node.token(bad)).await),
        ErrorCode::AlreadyAuthenticated
    );
    assert!(matches!(r.request(6, Request::Ping).await, Response::Pong));

    // The witness session was served throughout.
    witness.client.ping().await.expect("ping");
    witness.at(52.521, 13.405).await;
    node.stop().await;
}

/// docs/protocol.md §2: finishing the control stream ends the session and the node closes the
/// connection with code 0, reason `bye` — after answering what came before the finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_the_control_stream_closes_the_connection() {
    let node = TestNode::start().await;
    let user = uid(0, 77);
    let mut raw = Raw::connect(&node).await;
    assert!(matches!(
        raw.hello(user, node.token(user)).await,
        Response::Welcome(_)
    ));
    // A last request sent with the finish is still answered before the close.
    let last = frame::to_bytes(&RequestFrame {
        id: 2,
        request: Request::Ping,
    })
    .expect("encode");
    raw.send_raw(&last).await;
    raw.send.finish().expect("finish");
    let answer = raw.response().await.expect("the last request is answered");
    assert_eq!(answer.id, 2);
    assert!(matches!(answer.response, Response::Pong), "{answer:?}");
    let why = tokio::time::timeout(Duration::from_secs(10), raw.conn.closed())
        .await
        .expect("the node closes the connection");
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0));
            assert_eq!(&c.reason[..], b"bye");
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_node_refuses_the_dev_login_and_takes_issued_tokens() {
    let node = TestNode::start_production().await;
    let user = uid(0, 78);
    let mut raw = Raw::connect(&node).await;
    let answer = raw.request(1, Request::DevLogin { user }).await;
    assert_eq!(code(&answer), ErrorCode::Forbidden);
    // The same connection still authenticates with a token from the issuer.
    assert!(matches!(
        raw.request(
            2,
            Request::Hello {
                version: PROTOCOL_VERSION,
                user,
                token: node.token(user),
                client: "raw test".into(),
            },
        )
        .await,
        Response::Welcome(_)
    ));
    node.stop().await;
}
