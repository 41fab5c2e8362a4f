//! One client connection: the control stream (requests in, responses out, in order), the event
//! stream (pushes out), authentication, limits, and the mapping of requests onto the core.
//!
//! A session never trusts the client: frames are bounded before allocation, the first request
//! must authenticate, every request acts as the authenticated user only, requests are rate
//! limited, and a malformed frame ends the connection (its frame boundaries are lost) after a
//! `bad_frame` error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{
    frame, ErrorCode, Event, FrameBuffer, FrameError, GhostMode, Request, RequestFrame, Response,
    ResponseFrame, SessionInfo, GHOST_FOREVER, MAX_FRIENDS_PAGE, MAX_GHOST_S, MAX_HISTORY_PAGE,
    PROTOCOL_VERSION,
};
use nearby_index::geo::{Millis, UserId};
use nearby_raft::Command;
use tokio::time::Instant;

use crate::api::{outcome, Admission, Backend, LocationAck, ServiceError, SessionSink};
use crate::auth::{AuthError, Claims, TokenSigner, TokenVerifier};
use crate::clock::sleep_until;
use crate::metrics::{Refusal, ServiceMetrics};
use crate::queue::{CloseReason, EventQueue, Popped};
use crate::service::overload::TokenBucket;

/// QUIC application error code for a connection closed normally (shutdown, or the client done).
const CLOSE_DONE: u32 = 0;
/// QUIC application error code for a connection closed because of a protocol violation.
const CLOSE_PROTOCOL: u32 = 1;
/// QUIC application error code for a connection closed because the client read too slowly.
const CLOSE_SLOW: u32 = 2;
/// QUIC application error code for a connection closed because its token expired unrenewed.
const CLOSE_EXPIRED: u32 = 3;

/// How long before its token expires a session is asked to renew it.
const RENEW_LEAD: Duration = Duration::from_secs(60);

/// When the session's token expires, in the node's time and on this process's timer.
struct Expiry {
    expires_at: Millis,
    warn_at: Instant,
    close_at: Instant,
    warned: bool,
}

/// What every session shares.
pub(crate) struct Context<B> {
    pub(crate) core: Arc<B>,
    pub(crate) verifier: TokenVerifier,
    pub(crate) dev_signer: Option<Arc<TokenSigner>>,
    pub(crate) dev_token_ttl: Duration,
    pub(crate) requests_per_s: u32,
    pub(crate) min_update_interval: Duration,
    pub(crate) hello_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) connections: AtomicUsize,
    pub(crate) load: Option<Arc<super::overload::LoadGuard>>,
    pub(crate) metrics: Arc<crate::metrics::ServiceMetrics>,
}

/// Counts a connection for the service's limit while it lives.
struct ConnectionCount<B: Backend>(Arc<Context<B>>);

impl<B: Backend> Drop for ConnectionCount<B> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Session<B> {
    ctx: Arc<Context<B>>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    user: Option<UserId>,
    sink: Option<SessionSink>,
    started: bool,
    limit: TokenBucket,
    /// When the session's last location update was taken.
    last_update: Option<Instant>,
    /// The token's expiry, once authenticated.
    expiry: Option<Expiry>,
    out: Vec<u8>,
}

/// Serves one incoming connection to its end.
pub(crate) async fn serve<B: Backend>(incoming: quinn::Incoming, ctx: Arc<Context<B>>) {
    ctx.connections.fetch_add(1, Ordering::Relaxed);
    let _count = ConnectionCount(Arc::clone(&ctx));
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    // One deadline for the whole opening: control stream and Hello.
    let hello_by = Instant::now() + ctx.hello_timeout;
    let (send, recv) = match tokio::time::timeout_at(hello_by, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection ended before its control stream");
            return;
        }
        Err(_) => {
            conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no control stream");
            return;
        }
    };
    let mut s = Session {
        limit: TokenBucket::new(ctx.requests_per_s),
        ctx,
        conn,
        send,
        user: None,
        sink: None,
        started: false,
        last_update: None,
        expiry: None,
        out: Vec::new(),
    };
    match s.run(recv, hello_by).await {
        // The client finished its control stream: the session is over.
        Ok(()) => s.conn.close(quinn::VarInt::from_u32(CLOSE_DONE), b"bye"),
        Err(SessionEnd::HelloTimeout) => {
            s.conn
                .close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no hello in time");
        }
        Err(e) => tracing::debug!(user = ?s.user, error = %e, "session ended"),
    }
    if let (Some(user), Some(sink)) = (s.user, s.sink.take()) {
        s.ctx.metrics.session_closed();
        // Ends the event writer too.
        sink.events.close(CloseReason::SessionEnded);
        Box::pin(s.ctx.core.close_session(user, sink)).await;
    }
}

/// Why a session loop ended early.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("no hello within the deadline")]
    HelloTimeout,
    #[error("protocol violation: {0}")]
    Protocol(FrameError),
    #[error("the token expired")]
    Expired,
}

impl<B: Backend> Session<B> {
    async fn run(&mut self, mut recv: quinn::RecvStream, hello_by: Instant) -> Result<(), SessionEnd> {
        let mut frames = FrameBuffer::new();
        loop {
            // Chunks are quinn's own buffers: an idle session holds no read buffer of its own.
            let read = if self.user.is_none() {
                tokio::time::timeout_at(hello_by, recv.read_chunk(usize::MAX, true))
                    .await
                    .map_err(|_| SessionEnd::HelloTimeout)?
            } else {
                let next = self
                    .expiry
                    .as_ref()
                    .map(|e| if e.warned { e.close_at } else { e.warn_at });
                // `read_chunk` is cancel-safe: a timer firing first loses no data.
                tokio::select! {
                    read = recv.read_chunk(usize::MAX, true) => read,
                    () = sleep_until(next) => {
                        self.on_expiry()?;
                        continue;
                    }
                }
            };
            match read? {
                Some(chunk) => frames.extend(&chunk.bytes),
                None => return Ok(()),
            }
            loop {
                match frames.next_frame::<RequestFrame>() {
                    Ok(Some(f)) => {
                        // Boxed: the request's future is large and short-lived; inline, it would
                        // make every idle session's future as large as the largest request's.
                        let response = match Box::pin(self.handle(f.request)).await {
                            Ok(r) => r,
                            // The user's group left this node with the request in it: no
                            // answer; the session moves (a `Shutdown` notice, then a close as
                            // moved), and the SDK sends the request again where the group is.
                            Err(e) if e.is_moved() && self.sink.is_some() => {
                                if let Some(sink) = &self.sink {
                                    sink.events.close(CloseReason::Moved { to: None });
                                }
                                continue;
                            }
                            Err(e) => Response::Error(e.body()),
                        };
                        self.respond(f.id, response).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let code = match e {
                            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                            _ => ErrorCode::BadFrame,
                        };
                        let body = ServiceError::new(code, e.to_string()).body();
                        self.respond(0, Response::Error(body)).await?;
                        let _ = self.send.finish();
                        // Give the error a moment to reach the client before the close.
                        let _ = tokio::time::timeout(Duration::from_millis(500), self.send.stopped()).await;
                        self.conn
                            .close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), code.name().as_bytes());
                        return Err(SessionEnd::Protocol(e));
                    }
                }
            }
        }
    }

    async fn respond(&mut self, id: u64, response: Response) -> Result<(), SessionEnd> {
        self.out.clear();
        if let Err(e) = frame::encode(&ResponseFrame { id, response }, &mut self.out) {
            tracing::error!(error = %e, "cannot encode a response");
            let fallback = ResponseFrame {
                id,
                response: Response::Error(
                    ServiceError::new(ErrorCode::Internal, "response too large").body(),
                ),
            };
            self.out.clear();
            if frame::encode(&fallback, &mut self.out).is_err() {
                return Ok(());
            }
        }
        self.send.write_all(&self.out).await?;
        Ok(())
    }

    /// Starts the token's clock: a renewal request `RENEW_LEAD` before `expires_at` (at once if
    /// less is left), the connection closed at `expires_at`.
    fn arm(&mut self, expires_at: Millis) {
        let now = self.ctx.core.now();
        let left = Duration::from_millis(expires_at.0.saturating_sub(now.0));
        let close_at = Instant::now() + left;
        self.expiry = Some(Expiry {
            expires_at,
            warn_at: close_at - left.min(RENEW_LEAD),
            close_at,
            warned: false,
        });
    }

    /// The token's timer fired: ask for a renewal, or close.
    fn on_expiry(&mut self) -> Result<(), SessionEnd> {
        let Some(e) = self.expiry.as_mut() else {
            return Ok(());
        };
        if !e.warned {
            e.warned = true;
            if let Some(sink) = &self.sink {
                sink.events.push(Event::TokenExpiring {
                    expires_at: e.expires_at,
                });
            }
            return Ok(());
        }
        tracing::info!(user = ?self.user, "closing a session whose token expired unrenewed");
        self.conn
            .close(quinn::VarInt::from_u32(CLOSE_EXPIRED), b"token expired");
        Err(SessionEnd::Expired)
    }

    /// Checks a token for the session's user `user` at the node's time.
    fn verify(&self, token: &str, user: UserId) -> Result<Claims, ServiceError> {
        let claims = self
            .ctx
            .verifier
            .verify(token, self.ctx.core.now())
            .map_err(|e| match e {
                AuthError::Expired { .. } => ServiceError::new(ErrorCode::TokenExpired, e.to_string()),
                other => ServiceError::new(ErrorCode::TokenInvalid, other.to_string()),
            })?;
        if claims.user != user {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                format!("the token is for user {}, not {user}", claims.user),
            ));
        }
        Ok(claims)
    }

    fn me(&self) -> Result<UserId, ServiceError> {
        self.user
            .ok_or_else(|| ServiceError::new(ErrorCode::NotAuthenticated, "send Hello first"))
    }

    async fn handle(&mut self, request: Request) -> Result<Response, ServiceError> {
        if !self.limit.take() {
            return Err(ServiceError::new(
                ErrorCode::RateLimited,
                "too many requests; slow down",
            ));
        }
        let core = Arc::clone(&self.ctx.core);
        match request {
            Request::Hello {
                version,
                user,
                token,
                client,
            } => self.hello(version, user, &token, &client).await,
            Request::DevLogin { user } => self.dev_login(user).await,
            Request::UpdateLocation { at } => {
                let me = self.me()?;
                let now = Instant::now();
                // The pace starts after the session's first location: a reconnecting client
                // resumes with its last position, and the app's next update may follow at once.
                if self
                    .last_update
                    .is_some_and(|t| now.duration_since(t) < self.ctx.min_update_interval)
                {
                    self.ctx.metrics.refused(Refusal::TooSoon);
                    return Err(ServiceError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "location updates come at most every {} ms: this one was not applied",
                            self.ctx.min_update_interval.as_millis()
                        ),
                    ));
                }
                if self.started {
                    self.last_update = Some(now);
                }
                // Under overload a periodic update is refused before it touches anything; a
                // session's first location (its start) always goes through.
                if self.started && self.ctx.load.as_ref().is_some_and(|g| g.shed_update()) {
                    self.ctx.metrics.refused(Refusal::Shed);
                    return Err(ServiceError::new(
                        ErrorCode::RateLimited,
                        "the node is overloaded: this update was not applied; send the next one as usual",
                    ));
                }
                let ack = core.update_location(me, at, !self.started).await?;
                self.ctx.metrics.update();
                match ack {
                    LocationAck::Started { page, next_update_s } => {
                        self.started = true;
                        Ok(Response::Started { page, next_update_s })
                    }
                    LocationAck::Located { next_update_s } => Ok(Response::Located { next_update_s }),
                }
            }
            Request::ListNearby { cursor, page_size } => {
                Ok(Response::Nearby(core.list(self.me()?, cursor, page_size).await?))
            }
            Request::ListFriends { after, limit } => {
                let limit = limit.unwrap_or(MAX_FRIENDS_PAGE).clamp(1, MAX_FRIENDS_PAGE);
                Ok(Response::Friends(
                    core.friends(self.me()?, after, usize::from(limit)).await?,
                ))
            }
            Request::AddFriend { user } => {
                self.commit(Command::AddFriend {
                    from: self.me()?,
                    to: user,
                })
                .await
            }
            Request::RemoveFriend { user } => {
                self.commit(Command::RemoveFriend {
                    user: self.me()?,
                    friend: user,
                })
                .await
            }
            Request::SetSharing { on } => self.commit(Command::SetSharing { user: self.me()?, on }).await,
            Request::Hide { user } => {
                self.commit(Command::Hide {
                    user: self.me()?,
                    from: user,
                })
                .await
            }
            Request::Unhide { user } => {
                self.commit(Command::Unhide {
                    user: self.me()?,
                    from: user,
                })
                .await
            }
            Request::SetName { name } => {
                self.commit(Command::SetName {
                    user: self.me()?,
                    name,
                })
                .await
            }
            Request::SetRadius { meters } => {
                core.set_radius(self.me()?, meters).await?;
                Ok(Response::Done(nearby_client::proto::Outcome::Updated))
            }
            Request::Ping => Ok(Response::Pong),
            Request::ReadHistory { since, until, limit } => {
                let user = self.me()?;
                let until = until.unwrap_or_else(|| core.now().saturating_add(Duration::from_millis(1)));
                let limit = limit.unwrap_or(MAX_HISTORY_PAGE).min(MAX_HISTORY_PAGE) as usize;
                let page = core
                    .read_history(user, since.unwrap_or(Millis(0)), until, limit)
                    .await?;
                Ok(Response::History(page))
            }
            Request::DeleteHistory => {
                core.delete_history(self.me()?).await?;
                Ok(Response::Done(nearby_client::proto::Outcome::Updated))
            }
            Request::SetHistory { on } => self.commit(Command::SetHistory { user: self.me()?, on }).await,
            Request::Renew { token } => {
                let user = self.me()?;
                let claims = self.verify(&token, user)?;
                self.arm(claims.expires_at);
                Ok(Response::Done(nearby_client::proto::Outcome::Updated))
            }
            Request::ListStrangers { page_size } => {
                Ok(Response::Strangers(core.strangers(self.me()?, page_size).await?))
            }
            Request::SetDiscoverable { on } => {
                self.commit(Command::SetDiscoverable { user: self.me()?, on })
                    .await
            }
            Request::SetGhost { mode } => {
                let user = self.me()?;
                let until = ghost_until(mode, core.now())?;
                core.commit(Command::SetGhost { user, until }).await?;
                Ok(Response::Ghost { until })
            }
            Request::AllowFollower { user } => {
                self.commit(Command::GrantFollow {
                    user: self.me()?,
                    follower: user,
                })
                .await
            }
            Request::RevokeFollower { user } => {
                self.commit(Command::RevokeFollow {
                    user: self.me()?,
                    follower: user,
                })
                .await
            }
            Request::Unfollow { user } => {
                self.commit(Command::Unfollow {
                    follower: self.me()?,
                    user,
                })
                .await
            }
        }
    }

    async fn commit(&self, cmd: Command) -> Result<Response, ServiceError> {
        let r = self.ctx.core.commit(cmd).await?;
        Ok(Response::Done(outcome(&r)))
    }

    async fn hello(
        &mut self,
        version: u16,
        user: UserId,
        token: &str,
        client: &str,
    ) -> Result<Response, ServiceError> {
        if self.user.is_some() {
            return Err(ServiceError::new(
                ErrorCode::AlreadyAuthenticated,
                "already authenticated",
            ));
        }
        if version != PROTOCOL_VERSION {
            return Err(ServiceError::new(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this node speaks {PROTOCOL_VERSION}"),
            ));
        }
        let core = Arc::clone(&self.ctx.core);
        let claims = self.verify(token, user)?;
        let sink = match core.open_session(user).await? {
            Admission::Open(sink) => sink,
            Admission::Redirect { addr, reason } => {
                tracing::debug!(user, %addr, %reason, "redirecting");
                self.ctx.metrics.redirected();
                return Ok(Response::Redirect(nearby_client::proto::Redirect {
                    addr,
                    reason,
                }));
            }
        };
        self.ctx.metrics.session_opened();
        tokio::spawn(write_events(
            self.conn.clone(),
            Arc::clone(&sink.events),
            user,
            Arc::clone(&self.ctx.metrics),
        ));
        self.sink = Some(sink);
        self.user = Some(user);
        self.arm(claims.expires_at);
        self.started = core.has_location(user).await;
        tracing::debug!(user, client, "session authenticated");
        let limits = core.limits();
        Ok(Response::Welcome(SessionInfo {
            user,
            radius_m: limits.radius_m as u32,
            ttl_s: limits.ttl_s,
            page_size: limits.page_size,
            next_update_s: if self.started { 30 } else { 0 },
        }))
    }

    async fn dev_login(&mut self, user: UserId) -> Result<Response, ServiceError> {
        let Some(signer) = &self.ctx.dev_signer else {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                "dev login exists only on dev nodes",
            ));
        };
        let core = &self.ctx.core;
        core.ensure_registered(user).await?;
        let expires_at = core.now().saturating_add(self.ctx.dev_token_ttl);
        Ok(Response::Token {
            token: signer.sign(Claims { user, expires_at }),
            expires_at,
        })
    }
}

/// The end of ghost mode `mode` asks for, set at `now`: `None` ends it.
fn ghost_until(mode: GhostMode, now: Millis) -> Result<Option<Millis>, ServiceError> {
    match mode {
        GhostMode::Off => Ok(None),
        GhostMode::On => Ok(Some(GHOST_FOREVER)),
        GhostMode::For { seconds } if (1..=MAX_GHOST_S).contains(&seconds) => {
            Ok(Some(now.saturating_add(Duration::from_secs(seconds))))
        }
        GhostMode::For { seconds } => Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("a ghost mode of {seconds} s: the duration must be 1 s to {MAX_GHOST_S} s (or `on`)"),
        )),
    }
}

/// For an event carrying a location, how long ago the node took it (by this machine's clock,
/// which stamped it).
fn since_taken(event: &Event) -> Option<Duration> {
    let stamp = match event {
        Event::FriendMoved(f) | Event::FriendEntered(f) => f.updated_at,
        _ => return None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let now_ms = u64::try_from(now.as_millis()).ok()?;
    Some(Duration::from_millis(now_ms.saturating_sub(stamp.0)))
}

/// Pushes the session's events on a unidirectional stream until the queue closes.
async fn write_events(
    conn: quinn::Connection,
    queue: Arc<EventQueue>,
    user: UserId,
    metrics: Arc<ServiceMetrics>,
) {
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(user, error = %e, "cannot open the event stream");
            return;
        }
    };
    let mut buf = Vec::new();
    loop {
        let event = match queue.pop().await {
            Popped::Event(e) => e,
            Popped::Closed(CloseReason::SessionEnded) => return,
            Popped::Closed(reason @ (CloseReason::Shutdown | CloseReason::Moved { .. })) => {
                // Spread the reconnections of a stopping node's clients over two seconds, and a
                // moved group's (a leadership handed over, a split, a drain's round) over half
                // a second: the SDK carries their calls over meanwhile.
                let spread = match &reason {
                    CloseReason::Moved { .. } => 500,
                    _ => 2_000,
                };
                let reconnect_after_ms = (user.wrapping_mul(2_654_435_761) % spread) as u32;
                let redirect = match &reason {
                    CloseReason::Moved { to } => to.clone(),
                    _ => None,
                };
                metrics.redirected();
                buf.clear();
                let bye = Event::Shutdown {
                    reconnect_after_ms,
                    redirect,
                };
                // A client that stopped reading gets no more than a second of our time.
                let wrote = frame::encode(&bye, &mut buf).is_ok()
                    && matches!(
                        tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await,
                        Ok(Ok(()))
                    );
                if wrote {
                    let _ = stream.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.stopped()).await;
                }
                conn.close(quinn::VarInt::from_u32(CLOSE_DONE), reason.to_string().as_bytes());
                return;
            }
            Popped::Closed(reason) => {
                tracing::info!(user, %reason, "closing a session");
                if matches!(reason, CloseReason::Slow) {
                    metrics.slow_closed();
                }
                conn.close(quinn::VarInt::from_u32(CLOSE_SLOW), reason.to_string().as_bytes());
                return;
            }
        };
        buf.clear();
        if let Err(e) = frame::encode(&event, &mut buf) {
            tracing::error!(user, error = %e, "cannot encode an event");
            continue;
        }
        // A client that stops reading blocks this write (QUIC flow control) while the queue
        // fills behind it; when the queue gives up on the client, so does the write.
        tokio::select! {
            written = stream.write_all(&buf) => {
                if written.is_err() {
                    return;
                }
                metrics.pushed(since_taken(&event));
            }
            () = queue.closed() => {}
        }
    }
}
