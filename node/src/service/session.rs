//! One client session, whatever carries it: authentication, limits, the token's clock, and the
//! mapping of requests onto the core. The transports ([`super::tasks`], quinn's tasks per
//! connection; [`super::driver`], nearby's own batched driver on quinn-proto) own the streams
//! and hand this module whole requests; it answers each with a response, or with none when the
//! user's group moved away with the request in it.
//!
//! A session never trusts the client: frames are bounded before allocation (by the transport's
//! [`FrameBuffer`]), the first request must authenticate, every request acts as the
//! authenticated user only, requests are rate limited, and a malformed frame ends the connection
//! (its frame boundaries are lost) after a `bad_frame` error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{
    frame, ErrorCode, Event, FrameError, GhostMode, Request, Response, ResponseFrame, SessionInfo,
    GHOST_FOREVER, MAX_FRIENDS_PAGE, MAX_GHOST_S, MAX_HISTORY_PAGE, PROTOCOL_VERSION,
};
use nearby_index::geo::{Millis, UserId};
use nearby_raft::Command;
use tokio::time::Instant;

use crate::api::{outcome, Admission, Backend, LocationAck, ServiceError, SessionSink};
use crate::auth::{AuthError, Claims, TokenSigner, TokenVerifier};
use crate::metrics::Refusal;
use crate::queue::{CloseReason, Revoked};
use crate::service::overload::TokenBucket;

/// QUIC application error code for a connection closed normally (shutdown, or the client done).
pub(crate) const CLOSE_DONE: u32 = 0;
/// QUIC application error code for a connection closed because of a protocol violation.
pub(crate) const CLOSE_PROTOCOL: u32 = 1;
/// QUIC application error code for a connection closed because the client read too slowly.
pub(crate) const CLOSE_SLOW: u32 = 2;
/// QUIC application error code for a connection closed because its token expired unrenewed.
pub(crate) const CLOSE_EXPIRED: u32 = 3;

/// How long before its token expires a session is asked to renew it.
const RENEW_LEAD: Duration = Duration::from_secs(60);

/// How long a client that sent a malformed frame gets to receive its error before the close.
pub(crate) const BAD_FRAME_LINGER: Duration = Duration::from_millis(500);
/// How long a client that is told to go (shutdown, moved) gets to receive that before the close.
pub(crate) const GOODBYE_LINGER: Duration = Duration::from_secs(1);

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

impl<B: Backend> Context<B> {
    /// Counts a new connection against the limit: `None` when the service is full.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<ConnectionCount<B>> {
        let before = self.connections.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("connection limit reached; refusing");
            return None;
        }
        Some(ConnectionCount(Arc::clone(self)))
    }
}

/// Counts a connection for the service's limit while it lives.
pub(crate) struct ConnectionCount<B: Backend>(Arc<Context<B>>);

impl<B: Backend> Drop for ConnectionCount<B> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client's session: who it is, once authenticated, and what it may still do.
pub(crate) struct Session<B: Backend> {
    ctx: Arc<Context<B>>,
    user: Option<UserId>,
    sink: Option<SessionSink>,
    started: bool,
    /// Whether the session sent a location yet (its first is neither paced nor shed).
    located: bool,
    limit: TokenBucket,
    /// When the session's last location update was taken.
    last_update: Option<Instant>,
    /// The token's expiry, once authenticated.
    expiry: Option<Expiry>,
    /// The deadline for the first request, `Hello`.
    hello_by: Instant,
    /// Counted against the connection limit while the session lives.
    _count: ConnectionCount<B>,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionEnd {
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

impl SessionEnd {
    /// How the connection is closed for this end: the QUIC application code and reason, or
    /// `None` when it ended by itself.
    pub(crate) fn close(&self) -> Option<(u32, &'static str)> {
        match self {
            SessionEnd::HelloTimeout => Some((CLOSE_PROTOCOL, "no hello in time")),
            SessionEnd::Expired => Some((CLOSE_EXPIRED, "token expired")),
            SessionEnd::Read(_) | SessionEnd::Write(_) | SessionEnd::Protocol(_) => None,
        }
    }
}

/// The error answer to a malformed frame (sent with request id 0) and the close reason after it.
pub(crate) fn bad_frame(e: &FrameError) -> (Response, &'static str) {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::BadFrame,
    };
    (
        Response::Error(ServiceError::new(code, e.to_string()).body()),
        code.name(),
    )
}

/// Appends the frame of response `response` to request `id` to `out`; a response too large to
/// encode becomes an `internal` error. `false` only if not even that could be encoded.
pub(crate) fn encode_response(id: u64, response: Response, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    if let Err(e) = frame::encode(&ResponseFrame { id, response }, out) {
        tracing::error!(error = %e, "cannot encode a response");
        out.truncate(start);
        let fallback = ResponseFrame {
            id,
            response: Response::Error(ServiceError::new(ErrorCode::Internal, "response too large").body()),
        };
        if frame::encode(&fallback, out).is_err() {
            out.truncate(start);
            return false;
        }
    }
    true
}

/// How a closed event queue ends its connection.
pub(crate) enum Goodbye {
    /// Tell the client where to go (`Event::Shutdown`), give it [`GOODBYE_LINGER`] to read that,
    /// then close normally with this reason.
    Notice(Event, String),
    /// Close at once with this code and reason (slow reader, failure).
    Close(u32, String),
    /// The session itself ended: nothing to say.
    Quiet,
}

/// What a session's event stream does when its queue closes for `reason`.
pub(crate) fn goodbye(
    user: UserId,
    reason: &CloseReason,
    metrics: &crate::metrics::ServiceMetrics,
) -> Goodbye {
    match reason {
        CloseReason::SessionEnded => Goodbye::Quiet,
        CloseReason::Shutdown | CloseReason::Moved { .. } => {
            // Spread the reconnections of a stopping node's clients over two seconds, and a
            // moved group's (a leadership handed over, a split, a drain's round) over half a
            // second: the SDK carries their calls over meanwhile.
            let spread = match reason {
                CloseReason::Moved { .. } => 500,
                _ => 2_000,
            };
            let reconnect_after_ms = (user.wrapping_mul(2_654_435_761) % spread) as u32;
            let redirect = match reason {
                CloseReason::Moved { to } => to.clone(),
                _ => None,
            };
            metrics.redirected();
            Goodbye::Notice(
                Event::Shutdown {
                    reconnect_after_ms,
                    redirect,
                },
                reason.to_string(),
            )
        }
        CloseReason::Slow | CloseReason::Failed(_) => {
            tracing::info!(user, %reason, "closing a session");
            if matches!(reason, CloseReason::Slow) {
                metrics.slow_closed();
            }
            Goodbye::Close(CLOSE_SLOW, reason.to_string())
        }
    }
}

/// Drops from a page in `response` every entry about whom `revoked` names.
fn forget_revoked(response: &mut Response, revoked: &[Revoked]) {
    if revoked.is_empty() {
        return;
    }
    match response {
        Response::Started { page, .. } | Response::Nearby(page) => {
            page.friends.retain(|f| !revoked.contains(&Revoked::User(f.id)));
        }
        Response::Strangers(page) => page.strangers.retain(|s| {
            !revoked
                .iter()
                .any(|r| matches!(r, Revoked::Stranger(p) if *p == s.pseudonym))
        }),
        _ => {}
    }
}

impl<B: Backend> Session<B> {
    /// A new session on a connection counted by `count`, which must say `Hello` by `hello_by`.
    pub(crate) fn new(ctx: Arc<Context<B>>, count: ConnectionCount<B>, hello_by: Instant) -> Self {
        Session {
            limit: TokenBucket::new(ctx.requests_per_s),
            ctx,
            user: None,
            sink: None,
            started: false,
            located: false,
            last_update: None,
            expiry: None,
            hello_by,
            _count: count,
        }
    }

    /// The authenticated user.
    pub(crate) fn user(&self) -> Option<UserId> {
        self.user
    }

    /// Where the session's events come from, once authenticated.
    pub(crate) fn sink(&self) -> Option<&SessionSink> {
        self.sink.as_ref()
    }

    /// When the session's timer next fires: the Hello deadline, then the token's warnings.
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        match (&self.user, &self.expiry) {
            (None, _) => Some(self.hello_by),
            (Some(_), Some(e)) if e.warned => Some(e.close_at),
            (Some(_), Some(e)) => Some(e.warn_at),
            (Some(_), None) => None,
        }
    }

    /// The session's timer fired: `Err` ends the session.
    pub(crate) fn on_timer(&mut self) -> Result<(), SessionEnd> {
        if self.user.is_none() {
            return Err(SessionEnd::HelloTimeout);
        }
        self.on_expiry()
    }

    /// Answers `request`; `None` when the user's group left this node with the request in it:
    /// no answer then, the session moves (a `Shutdown` notice, then a close as moved), and the
    /// SDK sends the request again where the group is.
    pub(crate) async fn answer(&mut self, request: Request) -> Option<Response> {
        // Boxed: the request's future is large and short-lived; inline, it would make every idle
        // session's future as large as the largest request's.
        match Box::pin(self.handle(request)).await {
            Ok(r) => Some(r),
            Err(e) if e.is_moved() && self.sink.is_some() => {
                if let Some(sink) = &self.sink {
                    sink.events.close(CloseReason::Moved { to: None });
                }
                None
            }
            Err(e) => Some(Response::Error(e.body())),
        }
    }

    /// The session is over: its events stop and the core forgets it.
    pub(crate) async fn end(mut self) {
        if let (Some(user), Some(sink)) = (self.user, self.sink.take()) {
            self.ctx.metrics.session_closed();
            // Ends the event writer too.
            sink.events.close(CloseReason::SessionEnded);
            Box::pin(self.ctx.core.close_session(user, sink)).await;
        }
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

    /// The token's timer fired: ask for a renewal (`Ok`), or end the session (`Expired`).
    pub(crate) fn on_expiry(&mut self) -> Result<(), SessionEnd> {
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
        let mark = self.sink.as_ref().map(|s| s.events.revocations());
        let response = self.respond(request).await?;
        match mark {
            Some(mark) => self.without_revoked(mark, response),
            None => Ok(response),
        }
    }

    /// `response` without the page entries about whom a revocation reached this session since
    /// `mark` (see [`crate::queue::EventQueue::revoked_since`]).
    fn without_revoked(&self, mark: u64, mut response: Response) -> Result<Response, ServiceError> {
        let Some(sink) = &self.sink else {
            return Ok(response);
        };
        if !matches!(
            response,
            Response::Started { .. } | Response::Nearby(_) | Response::Strangers(_)
        ) {
            return Ok(response);
        }
        let Some(revoked) = sink.events.revoked_since(mark) else {
            return Err(ServiceError::unavailable(
                "visibility changed too often while the page was made: ask again",
            ));
        };
        forget_revoked(&mut response, &revoked);
        Ok(response)
    }

    async fn respond(&mut self, request: Request) -> Result<Response, ServiceError> {
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
                // The session's first location — a start, or a reconnecting client resuming with
                // its last position — is neither paced nor shed, and the app's next update may
                // follow it at once: the pace counts from the second.
                let periodic = self.located;
                if periodic
                    && self
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
                // Under overload a periodic update is refused before it touches anything (and
                // does not count for the pace: the client may send its next one at once).
                if periodic && self.ctx.load.as_ref().is_some_and(|g| g.shed_update()) {
                    self.ctx.metrics.refused(Refusal::Shed);
                    return Err(ServiceError::new(
                        ErrorCode::RateLimited,
                        "the node is overloaded: this update was not applied; send the next one as usual",
                    ));
                }
                if periodic {
                    self.last_update = Some(now);
                }
                let ack = core.update_location(me, at, !self.started).await?;
                self.located = true;
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
pub(crate) fn since_taken(event: &Event) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::lease::tests::friend;
    use nearby_client::proto::{NearbyPage, Stranger, StrangerPage};

    fn stranger(p: &str) -> Stranger {
        Stranger {
            pseudonym: p.into(),
            name: p.into(),
            distance_m: 500,
            updated_at: Millis(1),
        }
    }

    #[test]
    fn a_page_loses_exactly_the_users_revoked_while_it_was_on_its_way() {
        let revoked = [Revoked::User(2), Revoked::Stranger("b".into())];
        let mut nearby = Response::Nearby(NearbyPage {
            friends: vec![friend(1), friend(2), friend(3)],
            next: None,
        });
        forget_revoked(&mut nearby, &revoked);
        let Response::Nearby(page) = nearby else {
            unreachable!()
        };
        assert_eq!(page.friends.iter().map(|f| f.id).collect::<Vec<_>>(), [1, 3]);

        let mut started = Response::Started {
            page: NearbyPage {
                friends: vec![friend(2)],
                next: None,
            },
            next_update_s: 30,
        };
        forget_revoked(&mut started, &revoked);
        assert!(matches!(started, Response::Started { page, .. } if page.friends.is_empty()));

        let mut strangers = Response::Strangers(StrangerPage {
            strangers: vec![stranger("a"), stranger("b")],
            more: 0,
        });
        forget_revoked(&mut strangers, &revoked);
        let Response::Strangers(page) = strangers else {
            unreachable!()
        };
        assert_eq!(page.strangers, vec![stranger("a")]);

        // Nobody revoked on the page: it stays whole.
        let mut other = Response::Nearby(NearbyPage {
            friends: vec![friend(1)],
            next: None,
        });
        forget_revoked(&mut other, &revoked);
        assert!(matches!(other, Response::Nearby(page) if page.friends.len() == 1));
    }
}
