//! A small, real QUIC server speaking the nearby protocol, for the SDK tests. It does not use
//! the node crate: it answers from a table of canned behaviours, records every request it saw,
//! and lets a test push events, kill connections, or stop listening.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nearby_client::proto::{
    frame, Event, FrameBuffer, NearbyFriend, NearbyPage, Request, RequestFrame, Response, ResponseFrame,
    SessionInfo, ALPN,
};
use nearby_client::proto::{ErrorBody, ErrorCode, FriendList, Outcome};
use nearby_client::Millis;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The token the test server accepts.
pub(crate) const GOOD_TOKEN: &str = "good-token";

/// A user the server does not know.
pub(crate) const UNKNOWN_USER: u64 = 999;

/// `SetRadius` with this value is never answered (to hold a request in flight).
pub(crate) const HANG_RADIUS: u32 = 7;

/// Overrides the canned answer: `Some(response)` answers with it.
pub(crate) type Override = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

/// One request the server received.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    /// The connection it came on (numbered from 1 in accept order).
    pub(crate) conn: u64,
    /// The request.
    pub(crate) request: Request,
}

struct State {
    log: Mutex<Vec<Seen>>,
    changed: watch::Sender<u64>,
    conns: Mutex<Vec<LiveConn>>,
    radius_m: u32,
    overrides: Option<Override>,
}

struct LiveConn {
    conn: quinn::Connection,
    events: Arc<Mutex<Option<mpsc::Sender<Event>>>>,
}

/// A running test server on `127.0.0.1:0`.
pub(crate) struct TestServer {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The certificate to trust (self-signed, for `localhost`).
    pub(crate) ca_pem: String,
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl TestServer {
    /// Starts a server with the canned behaviour; `radius_m` tells servers apart in
    /// `SessionInfo`.
    pub(crate) fn start(radius_m: u32) -> TestServer {
        Self::start_with(radius_m, None)
    }

    /// Starts a server whose answers `overrides` may replace.
    pub(crate) fn start_with(radius_m: u32, overrides: Option<Override>) -> TestServer {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
            .expect("server cert");
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).expect("quic tls");
        let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = endpoint.local_addr().expect("local addr");
        let state = Arc::new(State {
            log: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            conns: Mutex::new(Vec::new()),
            radius_m,
            overrides,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), state.clone()));
        TestServer {
            addr,
            ca_pem: cert.cert.pem(),
            endpoint,
            state,
            accept,
        }
    }

    /// `host:port` of the server.
    pub(crate) fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Every request seen so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.log.lock().expect("log").clone()
    }

    /// Waits until `cond` holds over the requests seen, or fails the test after 10 s.
    pub(crate) async fn wait_until(&self, what: &str, cond: impl Fn(&[Seen]) -> bool) {
        let mut changed = self.state.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if cond(&self.state.log.lock().expect("log")) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                panic!("timed out waiting for: {what}; seen: {:#?}", self.seen());
            }
        }
    }

    /// Pushes `event` to every authenticated connection.
    pub(crate) async fn push(&self, event: Event) {
        let senders: Vec<_> = {
            let conns = self.state.conns.lock().expect("conns");
            conns
                .iter()
                .filter_map(|c| c.events.lock().expect("events").clone())
                .collect()
        };
        assert!(!senders.is_empty(), "no connection to push to");
        for s in senders {
            s.send(event.clone()).await.expect("push");
        }
    }

    /// Kills every live connection (as if the node crashed or the network broke).
    pub(crate) fn kill_connections(&self) {
        for c in self.state.conns.lock().expect("conns").drain(..) {
            c.conn.close(quinn::VarInt::from_u32(99), b"killed by the test");
        }
    }

    /// Stops accepting and kills every connection.
    pub(crate) fn stop(&self) {
        self.accept.abort();
        self.kill_connections();
        self.endpoint.close(quinn::VarInt::from_u32(98), b"stopped");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>) {
    let mut next_conn = 0;
    while let Some(incoming) = endpoint.accept().await {
        next_conn += 1;
        let state = state.clone();
        let conn_no = next_conn;
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let events = Arc::new(Mutex::new(None));
            state.conns.lock().expect("conns").push(LiveConn {
                conn: conn.clone(),
                events: events.clone(),
            });
            let _ = serve(conn, conn_no, state, events).await;
        });
    }
}

/// Serves one connection's control stream.
async fn serve(
    conn: quinn::Connection,
    conn_no: u64,
    state: Arc<State>,
    events: Arc<Mutex<Option<mpsc::Sender<Event>>>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 4096];
    let mut started = false;
    loop {
        let frame: RequestFrame = loop {
            if let Some(f) = buf.next_frame()? {
                break f;
            }
            match recv.read(&mut chunk).await? {
                Some(n) => buf.extend(&chunk[..n]),
                None => return Ok(()),
            }
        };
        {
            let mut log = state.log.lock().expect("log");
            log.push(Seen {
                conn: conn_no,
                request: frame.request.clone(),
            });
            let n = log.len() as u64;
            state.changed.send_replace(n);
        }
        let answer = state
            .overrides
            .as_ref()
            .and_then(|o| o(&frame.request))
            .or_else(|| canned(&frame.request, &mut started, state.radius_m));
        let Some(response) = answer else { continue };
        let welcome = matches!(response, Response::Welcome(_));
        let bytes = frame::to_bytes(&ResponseFrame {
            id: frame.id,
            response,
        })?;
        send.write_all(&bytes).await?;
        if welcome {
            let (tx, mut rx) = mpsc::channel::<Event>(16);
            *events.lock().expect("events") = Some(tx);
            let mut uni = conn.open_uni().await?;
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    let Ok(bytes) = frame::to_bytes(&event) else {
                        return;
                    };
                    if uni.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// The page every started session gets.
pub(crate) fn first_page() -> NearbyPage {
    NearbyPage {
        friends: vec![NearbyFriend {
            id: 2,
            relation: nearby_client::proto::Relation::Friend,
            name: "Bea".into(),
            distance_m: 420.5,
            updated_at: Millis(1_700_000_000_000),
        }],
        next: None,
    }
}

fn error(code: ErrorCode, message: &str) -> Response {
    Response::Error(ErrorBody {
        code,
        message: message.into(),
    })
}

/// The canned answers; `None` never answers.
fn canned(request: &Request, started: &mut bool, radius_m: u32) -> Option<Response> {
    Some(match request {
        Request::Hello { user, token, .. } => {
            if token == GOOD_TOKEN {
                Response::Welcome(SessionInfo {
                    user: *user,
                    radius_m,
                    ttl_s: 120,
                    page_size: 20,
                    next_update_s: 30,
                })
            } else {
                error(ErrorCode::TokenInvalid, "bad token")
            }
        }
        Request::DevLogin { user } => Response::Token {
            token: format!("tok-{user}"),
            expires_at: Millis(4_000_000_000_000),
        },
        Request::UpdateLocation { .. } => {
            if *started {
                Response::Located { next_update_s: 30 }
            } else {
                *started = true;
                Response::Started {
                    page: first_page(),
                    next_update_s: 30,
                }
            }
        }
        // Echo the cursor back as `next` so concurrent callers can check they got their answer.
        Request::ListNearby { cursor, .. } => {
            if *started {
                Response::Nearby(NearbyPage {
                    friends: Vec::new(),
                    next: cursor.clone(),
                })
            } else {
                error(ErrorCode::NotStarted, "send a location first")
            }
        }
        Request::ListFriends { .. } => Response::Friends(FriendList {
            entries: Vec::new(),
            sharing: true,
            discoverable: false,
            ghost_until: None,
            history: true,
            next: None,
        }),
        Request::AddFriend { user } | Request::RemoveFriend { user } if *user == UNKNOWN_USER => {
            error(ErrorCode::UnknownUser, "no such user")
        }
        Request::AddFriend { .. } => Response::Done(Outcome::FriendRequestSent),
        Request::RemoveFriend { .. } => Response::Done(Outcome::FriendRemoved),
        Request::SetRadius { meters } if *meters == HANG_RADIUS => return None,
        Request::SetName { name } if name.is_empty() => error(ErrorCode::InvalidArgument, "empty name"),
        Request::SetSharing { .. }
        | Request::Hide { .. }
        | Request::Unhide { .. }
        | Request::SetName { .. }
        | Request::SetRadius { .. }
        | Request::SetDiscoverable { .. }
        | Request::AllowFollower { .. }
        | Request::RevokeFollower { .. }
        | Request::Unfollow { .. }
        | Request::DeleteHistory
        | Request::SetHistory { .. }
        | Request::Renew { .. } => Response::Done(Outcome::Updated),
        Request::ReadHistory { .. } => Response::History(nearby_client::proto::HistoryPage {
            points: Vec::new(),
            more: false,
            complete: true,
        }),
        Request::SetGhost { .. } => Response::Ghost { until: None },
        Request::ListStrangers { .. } => Response::Strangers(nearby_client::proto::StrangerPage {
            strangers: Vec::new(),
            more: 0,
        }),
        Request::Ping => Response::Pong,
    })
}
