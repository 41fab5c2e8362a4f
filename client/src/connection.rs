//! quinn streams ⟷ protocol frames: the only module of the SDK that touches a socket.
//!
//! It owns dialling (resolve, QUIC + TLS), the *opening exchange* on a fresh control stream
//! (the first request — `Hello` or `DevLogin` — and its answer, following `Redirect`s for a
//! bounded number of hops), and reading/writing frames. It never decides what to do with a
//! response and never retries: [`crate::client`] does.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::ClientError;
use crate::proto::frame;
use crate::proto::{FrameBuffer, Request, RequestFrame, Response, ResponseFrame};

/// Redirects followed by one opening exchange before giving up: a cluster redirects a client
/// at most once to its home shard's leader, plus once more if leadership moved meanwhile.
pub(crate) const MAX_REDIRECTS: u32 = 4;

/// How long a node may take to answer before the next one is dialled as well.
pub(crate) const STAGGER: Duration = Duration::from_millis(300);

/// The request id of the opening exchange; the session's own requests count from 1.
pub(crate) const OPENING_ID: u64 = 0;

/// The QUIC application close code the client uses when it leaves on purpose.
const CLOSE_NORMAL: u32 = 0;

/// One live connection to a node: the QUIC connection and its control stream.
pub(crate) struct Link {
    /// The endpoint's socket; kept with the connection it carries.
    pub(crate) endpoint: quinn::Endpoint,
    /// Whether the endpoint is this link's own (not shared with other clients).
    pub(crate) owned: bool,
    /// The QUIC connection.
    pub(crate) conn: quinn::Connection,
    /// The writing half of the control stream.
    pub(crate) send: quinn::SendStream,
    /// The reading half of the control stream.
    pub(crate) recv: FrameReader,
    /// The `host:port` this link was dialled with (after redirects).
    pub(crate) addr: String,
}

impl Link {
    /// Closes the connection, telling the node it was on purpose.
    pub(crate) fn close(&self, reason: &str) {
        self.conn
            .close(quinn::VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
    }

    /// Closes the connection and waits (briefly) until the node has been told, so a process
    /// that exits right after does not leave the node waiting for its idle timeout.
    pub(crate) async fn close_gracefully(self, reason: &str) {
        self.close(reason);
        // A shared endpoint is never idle while other clients use it.
        if self.owned {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
        }
    }
}

/// Reads whole frames from a quinn receive stream.
pub(crate) struct FrameReader {
    stream: quinn::RecvStream,
    buf: FrameBuffer,
    chunk: Box<[u8]>,
}

impl FrameReader {
    /// Wraps a receive stream.
    pub(crate) fn new(stream: quinn::RecvStream) -> Self {
        FrameReader {
            stream,
            buf: FrameBuffer::new(),
            chunk: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    /// The next message; `Ok(None)` when the node finished the stream cleanly between frames.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(msg) = self.buf.next_frame()? {
                return Ok(Some(msg));
            }
            match self.stream.read(&mut self.chunk).await {
                Ok(Some(n)) => self.buf.extend(&self.chunk[..n]),
                Ok(None) if self.buf.pending() == 0 => return Ok(None),
                Ok(None) => {
                    return Err(ClientError::Protocol(
                        "the node ended a stream in the middle of a frame".into(),
                    ))
                }
                Err(e) => return Err(lost(e)),
            }
        }
    }
}

/// Writes one request frame on the control stream.
pub(crate) async fn write_request(
    send: &mut quinn::SendStream,
    request: &RequestFrame,
) -> Result<(), ClientError> {
    let bytes = frame::to_bytes(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    send.write_all(&bytes).await.map_err(lost)
}

fn connection_lost(e: impl std::fmt::Display) -> ClientError {
    lost(e)
}

/// Maps a stream or connection failure to [`ClientError::ConnectionLost`].
pub(crate) fn lost(e: impl std::fmt::Display) -> ClientError {
    ClientError::ConnectionLost {
        reason: e.to_string(),
    }
}

/// How to reach nodes: TLS settings and the name their certificates carry.
#[derive(Clone)]
pub(crate) struct Dialer {
    /// quinn + rustls client settings (roots, ALPN).
    pub(crate) tls: quinn::ClientConfig,
    /// The name the node's certificate must carry.
    pub(crate) server_name: String,
    /// Longest wait for one hop (dial + opening exchange).
    pub(crate) timeout: Duration,
    /// An endpoint shared with other clients, if the app gave one.
    pub(crate) shared: Option<quinn::Endpoint>,
}

impl Dialer {
    /// Dials `addr` and makes the opening exchange with `first` (`Hello` or `DevLogin`),
    /// following redirects. Returns the link and the node's answer, which is never a
    /// `Redirect`: an `Error` answer is returned as is, for the caller to judge.
    pub(crate) async fn open(&self, addr: &str, first: &Request) -> Result<(Link, Response), ClientError> {
        self.open_avoiding(addr, first, &mut HashSet::new()).await
    }

    /// [`Dialer::open`], recording in `dead` every address that could not be dialled and
    /// giving up at once on a redirect to one of them.
    async fn open_avoiding(
        &self,
        addr: &str,
        first: &Request,
        dead: &mut HashSet<String>,
    ) -> Result<(Link, Response), ClientError> {
        let mut addr = addr.to_string();
        let mut hops = 0;
        loop {
            if dead.contains(&addr) {
                return Err(ClientError::Connect {
                    endpoint: addr,
                    reason: "did not answer a moment ago".into(),
                });
            }
            let during = "connecting and authenticating";
            let hop = tokio::time::timeout(self.timeout, self.hop(&addr, first))
                .await
                .map_err(|_| ClientError::Timeout {
                    during,
                    after_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                })
                .and_then(|r| r);
            let (link, response) = match hop {
                Ok(ok) => ok,
                Err(e) => {
                    if matches!(e, ClientError::Timeout { .. } | ClientError::Connect { .. }) {
                        dead.insert(addr);
                    }
                    return Err(e);
                }
            };
            match response {
                Response::Redirect(redirect) => {
                    link.close("redirected");
                    hops += 1;
                    tracing::debug!(from = %addr, to = %redirect.addr, reason = %redirect.reason, "redirected");
                    if hops > MAX_REDIRECTS {
                        return Err(ClientError::TooManyRedirects {
                            hops,
                            last: redirect.addr,
                        });
                    }
                    addr = redirect.addr;
                }
                other => return Ok((link, other)),
            }
        }
    }

    /// [`Dialer::open`] at the first of `endpoints` that answers, starting at `start` and going
    /// round: the next node is dialled as soon as one fails, or [`STAGGER`] after the previous
    /// one started if it has not answered yet (a dead node costs a stagger, not a connect
    /// timeout). Nodes in `avoid` (silent a moment ago) are tried last. The first answer wins; the
    /// other attempts are dropped. A refusal that retrying cannot help ends the race at once.
    pub(crate) async fn open_any(
        &self,
        endpoints: &[String],
        start: usize,
        first: &Request,
        avoid: &HashSet<String>,
    ) -> Result<(Link, Response), ClientError> {
        let n = endpoints.len();
        let mut order: Vec<String> = (0..n).map(|i| endpoints[(start + i) % n].clone()).collect();
        order.sort_by_key(|a| avoid.contains(a));
        let mut attempts = tokio::task::JoinSet::new();
        let mut next = 0;
        let mut last = ClientError::Config("no endpoint configured".into());
        // Each turn follows an event that calls for the next node: the start, a failure, or
        // the stagger passing with no answer.
        loop {
            if next < order.len() {
                let (dialer, addr, first) = (self.clone(), order[next].clone(), first.clone());
                attempts.spawn(async move {
                    let r = dialer.open(&addr, &first).await;
                    (addr, r)
                });
                next += 1;
            }
            if attempts.is_empty() {
                return Err(last);
            }
            tokio::select! {
                done = attempts.join_next() => match done {
                    Some(Ok((_, Ok(ok)))) => {
                        attempts.abort_all();
                        return Ok(ok);
                    }
                    Some(Ok((addr, Err(e)))) if e.is_retryable() => {
                        tracing::debug!(%addr, error = %e, "node unavailable; trying the next");
                        last = e;
                    }
                    Some(Ok((_, Err(e)))) => {
                        attempts.abort_all();
                        return Err(e);
                    }
                    Some(Err(e)) => last = connection_lost(e),
                    None => return Err(last),
                },
                () = tokio::time::sleep(STAGGER), if next < order.len() => {}
            }
        }
    }

    /// One hop: dial and ask, no redirect handling.
    async fn hop(&self, addr: &str, first: &Request) -> Result<(Link, Response), ClientError> {
        let mut link = self.dial(addr).await?;
        let request = RequestFrame {
            id: OPENING_ID,
            request: first.clone(),
        };
        write_request(&mut link.send, &request).await?;
        let answer: ResponseFrame = link.recv.next().await?.ok_or_else(|| {
            ClientError::Protocol("the node closed the control stream without answering".into())
        })?;
        if answer.id != OPENING_ID {
            return Err(ClientError::Protocol(format!(
                "the opening request was answered with id {}",
                answer.id
            )));
        }
        Ok((link, answer.response))
    }

    /// Resolves `addr`, connects with TLS and opens the control stream.
    async fn dial(&self, addr: &str) -> Result<Link, ClientError> {
        let target = resolve(addr).await?;
        let connect_err = |reason: String| ClientError::Connect {
            endpoint: addr.to_string(),
            reason,
        };
        let bind: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let (endpoint, owned) = match &self.shared {
            Some(e) => (e.clone(), false),
            None => (
                quinn::Endpoint::client(bind)
                    .map_err(|e| connect_err(format!("cannot open a UDP socket: {e}")))?,
                true,
            ),
        };
        let conn = endpoint
            .connect_with(self.tls.clone(), target, &self.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
        Ok(Link {
            endpoint,
            owned,
            conn,
            send,
            recv: FrameReader::new(recv),
            addr: addr.to_string(),
        })
    }
}

/// The first address `addr` (`host:port`) resolves to.
async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let resolve_err = |source: std::io::Error| ClientError::Resolve {
        endpoint: addr.to_string(),
        source: std::sync::Arc::new(source),
    };
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(resolve_err)?;
    addrs.next().ok_or_else(|| {
        resolve_err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address found",
        ))
    })
}
