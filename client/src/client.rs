//! The async SDK: [`Client`], a cheap, cloneable handle, and the background *driver* task that
//! owns the connection.
//!
//! # How it works
//!
//! - Each call sends a command over a bounded channel to the driver, which gives it the next
//!   request id, writes the frame on the control stream and keeps a one-shot reply slot; a
//!   reader task per connection hands responses back, matched by id. A semaphore of
//!   [`ClientConfig::max_in_flight`] permits bounds the calls in flight: nothing queues without
//!   bound.
//! - A second task per connection reads the node's event stream into the app's bounded event
//!   channel ([`Client::events`]). When that channel is full the task stops reading, QUIC flow
//!   control pushes back, and the node drops superseded locations for this session: a slow app
//!   costs bounded memory everywhere.
//! - When the connection drops, or the node announces [`Event::Shutdown`], the driver fails
//!   every call in flight with [`ClientError::ConnectionLost`], then reconnects with jittered
//!   exponential backoff ([`crate::Backoff`]), says `Hello` again, and *resumes*: it re-sends the
//!   last location sent, so the node restarts the session and the app gets the fresh first page
//!   as [`SdkEvent::Resumed`]. Calls made while it waits between attempts fail at once with
//!   [`ClientError::Reconnecting`]; calls made while it dials wait (bounded by
//!   [`ClientConfig::connect_timeout`]) for the outcome of that attempt.
//! - The driver stops when the app calls [`Client::close`] or drops the last handle, or when it
//!   gives up reconnecting ([`SdkEvent::Closed`]).
//!
//! The driver never blocks on the app: status events are offered without waiting (dropped if
//! the app's event channel is full) and only the event task waits for the app.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::ClientConfig;
use crate::connection::{self, Dialer, FrameReader, Link, OPENING_ID};
use crate::error::ClientError;
use crate::proto::{
    Coord, Event, FriendList, GhostMode, HistoryPage, NearbyPage, Outcome, Request, RequestFrame, RequestId,
    Response, ResponseFrame, SessionInfo, StrangerPage, PROTOCOL_VERSION,
};
use crate::{tls, LatLng, Millis, UserId};

/// What the app receives on [`Client::events`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SdkEvent {
    /// A push from the node (a friend moved, entered, left, …). [`Event::Shutdown`] is passed on
    /// too, for information: the client handles it by itself.
    Event(Event),
    /// The connection is gone; attempt `attempt` (1-based) to reconnect starts after `after`.
    Reconnecting {
        /// 1-based attempt number since the connection was lost.
        attempt: u32,
        /// How long the client waits before this attempt.
        after: Duration,
        /// Why the client is (still) not connected.
        reason: ClientError,
        /// The node moved the session on purpose (a drain, a moved or split group, a node
        /// stopping): a redirect, not a failure. The app's calls meanwhile wait for the next
        /// connection instead of failing (for up to 10 s).
        planned: bool,
    },
    /// The client is connected and authenticated again. If a location had been sent before,
    /// it was re-sent and `page` is the fresh first page of friends in range: replace the
    /// list with it. `None` if no location was ever sent (or the node could not give a page).
    Resumed {
        /// The fresh first page, when a location was re-sent.
        page: Option<NearbyPage>,
    },
    /// The client stopped for good; every further call fails with [`ClientError::Closed`].
    Closed(ClientError),
}

/// The node's answer to [`Client::update_location`].
#[derive(Clone, Debug, PartialEq)]
pub enum LocationAck {
    /// The location started the session: the first page of friends in range.
    Started {
        /// Friends in range, nearest first.
        page: NearbyPage,
        /// Seconds until the node wants the next update.
        next_update_s: u32,
    },
    /// The location was stored in a running session.
    Located {
        /// When the node wants the next update, in seconds.
        next_update_s: u32,
    },
}

/// A connected client. Cheap to clone: every clone talks through the same connection, and calls
/// may be made from many tasks at once. The connection closes when [`Client::close`] is called
/// or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    slots: Arc<Semaphore>,
    session: watch::Receiver<SessionInfo>,
    events: Arc<Mutex<Option<mpsc::Receiver<SdkEvent>>>>,
    links: Arc<Mutex<Links>>,
}

/// What the client's connections sent and received so far: what a phone's radio did for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// UDP datagrams sent (each may hold several QUIC packets).
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Bytes sent, UDP payloads.
    pub bytes_sent: u64,
    /// Bytes received, UDP payloads.
    pub bytes_received: u64,
    /// Connections made (the first one and every reconnect).
    pub connections: u64,
}

impl LinkStats {
    fn of(conn: &quinn::Connection) -> LinkStats {
        let s = conn.stats();
        LinkStats {
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            connections: 1,
        }
    }

    fn add(&mut self, o: LinkStats) {
        self.datagrams_sent += o.datagrams_sent;
        self.datagrams_received += o.datagrams_received;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.connections += o.connections;
    }
}

/// The connections of a client: the current one, and the totals of those gone.
#[derive(Default)]
struct Links {
    current: Option<quinn::Connection>,
    past: LinkStats,
}

impl Links {
    fn replace(&mut self, conn: Option<quinn::Connection>) {
        if let Some(old) = self.current.take() {
            self.past.add(LinkStats::of(&old));
        }
        self.current = conn;
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &*self.session.borrow())
            .finish_non_exhaustive()
    }
}

/// What a handle asks the driver.
enum Command {
    /// Send a request; answer on `reply`. `permit` is released with the reply slot.
    Request {
        request: Request,
        reply: oneshot::Sender<Result<Response, ClientError>>,
        permit: OwnedSemaphorePermit,
    },
    /// Close the connection and stop; acknowledge when done.
    Close(oneshot::Sender<()>),
}

impl Client {
    /// Connects to the first of `config.endpoints` that answers (following redirects),
    /// authenticates with `Hello`, and
    /// starts the background driver. The first connection is not retried: a failure here is
    /// returned at once for the app to judge ([`ClientError::is_retryable`]).
    ///
    /// MUST be called inside a tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.max_in_flight == 0 || config.event_capacity == 0 {
            return Err(ClientError::Config(
                "max_in_flight and event_capacity must be at least 1".into(),
            ));
        }
        let dialer = Dialer {
            tls: tls::client_config_with(&config.ca_pem, config.keep_alive, config.idle_timeout)?,
            server_name: config.server_name.clone(),
            timeout: config.connect_timeout,
            shared: config.shared_endpoint.clone(),
        };
        let (link, info) = hello_any(&dialer, &config, 0, &HashSet::new()).await?;
        let (commands_tx, commands) = mpsc::channel(config.max_in_flight);
        let (events_tx, events_rx) = mpsc::channel(config.event_capacity);
        let (session_tx, session) = watch::channel(info);
        let slots = Arc::new(Semaphore::new(config.max_in_flight));
        let links = Arc::new(Mutex::new(Links::default()));
        let driver = Driver {
            links: Arc::clone(&links),
            live: None,
            pending: HashMap::new(),
            carried: Vec::new(),
            next_id: OPENING_ID + 1,
            last_location: None,
            strangers: None,
            commands,
            events: events_tx,
            session: session_tx,
            slots: slots.clone(),
            dialer,
            config,
        };
        tokio::spawn(driver.run(link));
        Ok(Client {
            commands: commands_tx,
            slots,
            session,
            events: Arc::new(Mutex::new(Some(events_rx))),
            links,
        })
    }

    /// What the client's connections sent and received so far (every connection it made).
    pub fn link_stats(&self) -> LinkStats {
        let links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut total = links.past;
        if let Some(conn) = &links.current {
            total.add(LinkStats::of(conn));
        }
        total
    }

    /// Asks a dev node — the first of `endpoints` that answers — for a token for `user`
    /// (registered on first use), following redirects. Returns the token and when it expires. A
    /// node not in dev mode refuses with [`crate::proto::ErrorCode::Forbidden`].
    pub async fn dev_login(
        endpoints: &[String],
        server_name: &str,
        ca_pem: &str,
        user: UserId,
    ) -> Result<(String, Millis), ClientError> {
        let dialer = Dialer {
            tls: tls::client_config(ca_pem)?,
            server_name: server_name.to_string(),
            timeout: Duration::from_secs(10),
            shared: None,
        };
        let (link, response) = dialer
            .open_any(endpoints, 0, &Request::DevLogin { user }, &HashSet::new())
            .await?;
        link.close_gracefully("logged in").await;
        match response {
            Response::Token { token, expires_at } => Ok((token, expires_at)),
            other => Err(unexpected("DevLogin", other)),
        }
    }

    /// The session parameters of the current connection (they may change on reconnect).
    pub fn session(&self) -> SessionInfo {
        self.session.borrow().clone()
    }

    /// Takes the event stream. Returns `None` after the first call: there is one stream per
    /// client. Drain it steadily, or drop it to discard events; an untaken, full stream pauses
    /// the node's pushes to this session (see the module documentation).
    pub fn events(&self) -> Option<mpsc::Receiver<SdkEvent>> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Sends the user's location. The first one of a session starts it and returns the first
    /// page of friends in range; later ones return the cadence the node wants. Coordinates are
    /// checked before anything is sent. The location is remembered and re-sent on reconnect.
    pub async fn update_location(&self, at: Coord) -> Result<LocationAck, ClientError> {
        if let Err(e) = LatLng::new(at.lat, at.lon) {
            return Err(ClientError::InvalidCoordinates {
                lat: at.lat,
                lon: at.lon,
                reason: e.to_string(),
            });
        }
        match self.call(Request::UpdateLocation { at }).await? {
            Response::Started { page, next_update_s } => Ok(LocationAck::Started { page, next_update_s }),
            Response::Located { next_update_s } => Ok(LocationAck::Located { next_update_s }),
            other => Err(unexpected("UpdateLocation", other)),
        }
    }

    /// A page of friends in range, nearest first: `cursor` is `None` for the first page, else
    /// the previous page's `next`; `page_size` `None` takes the node's default. Fails with
    /// [`crate::proto::ErrorCode::NotStarted`] if the node holds no location of the user.
    pub async fn list_nearby(
        &self,
        cursor: Option<String>,
        page_size: Option<u16>,
    ) -> Result<NearbyPage, ClientError> {
        match self.call(Request::ListNearby { cursor, page_size }).await? {
            Response::Nearby(page) => Ok(page),
            other => Err(unexpected("ListNearby", other)),
        }
    }

    /// The user's friends, pending requests, and whether they share their location.
    pub async fn list_friends(&self) -> Result<FriendList, ClientError> {
        let mut all = self.list_friends_page(None, None).await?;
        while let Some(after) = all.next.take() {
            let mut page = self.list_friends_page(Some(after), None).await?;
            all.entries.append(&mut page.entries);
            all.next = page.next;
        }
        Ok(all)
    }

    /// One page of the user's relations: those with users after `after` (ascending by id), at
    /// most `limit` users ([`crate::proto::MAX_FRIENDS_PAGE`] if `None`); `next` names the page
    /// after.
    pub async fn list_friends_page(
        &self,
        after: Option<UserId>,
        limit: Option<u16>,
    ) -> Result<FriendList, ClientError> {
        match self.call(Request::ListFriends { after, limit }).await? {
            Response::Friends(list) => Ok(list),
            other => Err(unexpected("ListFriends", other)),
        }
    }

    /// Asks `user` to be friends, or accepts their request.
    pub async fn add_friend(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::AddFriend { user }).await
    }

    /// Ends a friendship, or cancels / declines a request.
    pub async fn remove_friend(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::RemoveFriend { user }).await
    }

    /// Turns location sharing on or off.
    pub async fn set_sharing(&self, on: bool) -> Result<Outcome, ClientError> {
        self.change(Request::SetSharing { on }).await
    }

    /// Hides the user from one friend.
    pub async fn hide(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::Hide { user }).await
    }

    /// Stops hiding the user from one friend.
    pub async fn unhide(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::Unhide { user }).await
    }

    /// Changes the user's display name (1–64 characters, no control characters).
    pub async fn set_name(&self, name: impl Into<String>) -> Result<Outcome, ClientError> {
        self.change(Request::SetName { name: name.into() }).await
    }

    /// Chooses a search radius in metres (the node caps it at its own).
    pub async fn set_radius(&self, meters: u32) -> Result<Outcome, ClientError> {
        self.change(Request::SetRadius { meters }).await
    }

    /// Lets opted-in strangers nearby see the user (coarsely, under a pseudonym), or stops it.
    pub async fn set_discoverable(&self, on: bool) -> Result<Outcome, ClientError> {
        self.change(Request::SetDiscoverable { on }).await
    }

    /// Ghost mode: hidden from everyone for a while ([`GhostMode::For`]), until turned off
    /// ([`GhostMode::On`]), or visible again ([`GhostMode::Off`]). Returns when it ends
    /// ([`crate::proto::GHOST_FOREVER`]: until turned off), or `None` if it is off.
    pub async fn set_ghost(&self, mode: GhostMode) -> Result<Option<Millis>, ClientError> {
        match self.call(Request::SetGhost { mode }).await? {
            Response::Ghost { until } => Ok(until),
            other => Err(unexpected("SetGhost", other)),
        }
    }

    /// Lets `user` follow the user: they see the user's location like a friend's, the user
    /// sees nothing of them.
    pub async fn allow_follower(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::AllowFollower { user }).await
    }

    /// Stops letting `user` follow; nothing more about the user reaches them once answered.
    pub async fn revoke_follower(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::RevokeFollower { user }).await
    }

    /// Stops following `user`.
    pub async fn unfollow(&self, user: UserId) -> Result<Outcome, ClientError> {
        self.change(Request::Unfollow { user }).await
    }

    /// The nearest discoverable strangers in range (under per-viewer pseudonyms, at distances
    /// rounded up to 500 m) and how many more there are; `page_size` `None` takes the node's
    /// default. From the first call on, the session also gets live `StrangerNearby` /
    /// `StrangerGone` events for that page. Fails with
    /// [`crate::proto::ErrorCode::NotStarted`] without a live location.
    pub async fn list_strangers(&self, page_size: Option<u16>) -> Result<StrangerPage, ClientError> {
        match self.call(Request::ListStrangers { page_size }).await? {
            Response::Strangers(page) => Ok(page),
            other => Err(unexpected("ListStrangers", other)),
        }
    }

    /// The user's own location history with `since <= recorded_at < until` (`None`: from the
    /// beginning / until now), oldest first, at most `limit` points (1,000 at most); `more` says
    /// whether to ask again from the last point's time + 1.
    pub async fn read_history(
        &self,
        since: Option<Millis>,
        until: Option<Millis>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        match self.call(Request::ReadHistory { since, until, limit }).await? {
            Response::History(page) => Ok(page),
            other => Err(unexpected("ReadHistory", other)),
        }
    }

    /// Deletes all of the user's location history, from every node's disk.
    pub async fn delete_history(&self) -> Result<Outcome, ClientError> {
        self.change(Request::DeleteHistory).await
    }

    /// Turns recording of the user's location history on or off.
    pub async fn set_history(&self, on: bool) -> Result<Outcome, ClientError> {
        self.change(Request::SetHistory { on }).await
    }

    /// Hands the node a fresh token for this session (after [`crate::proto::Event::TokenExpiring`],
    /// or any time before the current one expires); reconnections use it too.
    pub async fn renew(&self, token: impl Into<String>) -> Result<Outcome, ClientError> {
        self.change(Request::Renew { token: token.into() }).await
    }

    /// Checks the connection; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(Request::Ping).await? {
            Response::Pong => Ok(start.elapsed()),
            other => Err(unexpected("Ping", other)),
        }
    }

    /// Closes the connection (telling the node) and stops the driver. Calls in flight fail with
    /// [`ClientError::Closed`]; so does every later call, from any clone.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.commands.send(Command::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// A request answered with `Done`.
    async fn change(&self, request: Request) -> Result<Outcome, ClientError> {
        let what = request_name(&request);
        match self.call(request).await? {
            Response::Done(outcome) => Ok(outcome),
            other => Err(unexpected(what, other)),
        }
    }

    /// Sends one request through the driver and waits for its answer.
    async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                request,
                reply,
                permit,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }
}

/// Maps an answer that is not the expected one: a node error becomes [`ClientError::Server`],
/// anything else is a protocol violation.
fn unexpected(what: &str, response: Response) -> ClientError {
    match response {
        Response::Error(body) => ClientError::Server(body),
        other => ClientError::Protocol(format!("unexpected answer to {what}: {other:?}")),
    }
}

/// The request's name, for messages.
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::UpdateLocation { .. } => "UpdateLocation",
        Request::ListNearby { .. } => "ListNearby",
        Request::ListFriends { .. } => "ListFriends",
        Request::AddFriend { .. } => "AddFriend",
        Request::RemoveFriend { .. } => "RemoveFriend",
        Request::SetSharing { .. } => "SetSharing",
        Request::Hide { .. } => "Hide",
        Request::Unhide { .. } => "Unhide",
        Request::SetName { .. } => "SetName",
        Request::SetRadius { .. } => "SetRadius",
        Request::Ping => "Ping",
        Request::DevLogin { .. } => "DevLogin",
        Request::SetDiscoverable { .. } => "SetDiscoverable",
        Request::SetGhost { .. } => "SetGhost",
        Request::AllowFollower { .. } => "AllowFollower",
        Request::RevokeFollower { .. } => "RevokeFollower",
        Request::Unfollow { .. } => "Unfollow",
        Request::ListStrangers { .. } => "ListStrangers",
        Request::ReadHistory { .. } => "ReadHistory",
        Request::DeleteHistory => "DeleteHistory",
        Request::SetHistory { .. } => "SetHistory",
        Request::Renew { .. } => "Renew",
    }
}

fn hello_request(config: &ClientConfig) -> Request {
    Request::Hello {
        version: PROTOCOL_VERSION,
        user: config.user,
        token: config.token.clone(),
        client: config.client_name.clone(),
    }
}

/// Dials `addr` and authenticates: the link and the node's session parameters.
async fn hello(
    dialer: &Dialer,
    config: &ClientConfig,
    addr: &str,
) -> Result<(Link, SessionInfo), ClientError> {
    let (link, response) = dialer.open(addr, &hello_request(config)).await?;
    welcome(link, response)
}

/// Dials the configured endpoints in turn, starting at `start`, and authenticates.
async fn hello_any(
    dialer: &Dialer,
    config: &ClientConfig,
    start: usize,
    avoid: &HashSet<String>,
) -> Result<(Link, SessionInfo), ClientError> {
    let (link, response) = dialer
        .open_any(&config.endpoints, start, &hello_request(config), avoid)
        .await?;
    welcome(link, response)
}

fn welcome(link: Link, response: Response) -> Result<(Link, SessionInfo), ClientError> {
    match response {
        Response::Welcome(info) => Ok((link, info)),
        other => {
            link.close("refused");
            Err(unexpected("Hello", other))
        }
    }
}

/// A node's notice that it is going away.
struct ShutdownNotice {
    after: Duration,
    redirect: Option<String>,
}

/// A connected link and the tasks reading it. Dropping it stops the tasks, so a connection's
/// late events can never be delivered after the next connection's.
struct Live {
    endpoint: quinn::Endpoint,
    owned: bool,
    conn: quinn::Connection,
    send: quinn::SendStream,
    addr: String,
    responses: mpsc::Receiver<Result<ResponseFrame, ClientError>>,
    shutdown: mpsc::Receiver<ShutdownNotice>,
    /// Whether the event task may still report a shutdown.
    shutdown_open: bool,
    tasks: [JoinHandle<()>; 2],
}

impl Live {
    /// Closes the connection and waits (briefly) until the node has been told, so a process
    /// that exits right after does not leave the node waiting for its idle timeout.
    async fn close_gracefully(self, reason: &str) {
        self.conn.close(quinn::VarInt::from_u32(0), reason.as_bytes());
        // A shared endpoint is never idle while other clients use it.
        if self.owned {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One turn of the connected loop.
enum Step {
    Response(Option<Result<ResponseFrame, ClientError>>),
    Shutdown(Option<ShutdownNotice>),
    Command(Option<Command>),
    /// A request went unanswered for the request timeout.
    Overdue,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The longest a relation or privacy change may take to be answered: the node confirms a
/// change that ends someone's permission only once every viewer's group has acted on it (at
/// most 5 s, after a 3 s grace when a group's leader has just changed), the other side of a
/// relation after its delivery, and a change routed by an older map once the map moves on
/// (`docs/protocol.md`). A dead node is still noticed sooner by the QUIC idle timeout.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `request` may go unanswered before the node is taken for gone.
fn answer_within(request: &Request, timeout: Duration) -> Duration {
    let waits_for_others = matches!(
        request,
        Request::AddFriend { .. }
            | Request::RemoveFriend { .. }
            | Request::SetSharing { .. }
            | Request::Hide { .. }
            | Request::Unhide { .. }
            | Request::SetDiscoverable { .. }
            | Request::SetGhost { .. }
            | Request::AllowFollower { .. }
            | Request::RevokeFollower { .. }
            | Request::Unfollow { .. }
            | Request::DeleteHistory
            | Request::SetHistory { .. }
    );
    if waits_for_others {
        timeout.max(CHANGE_TIMEOUT)
    } else {
        timeout
    }
}

/// How long a client whose control stream ended waits for the connection's close (and the
/// node's reason) before taking the connection for lost.
const CLOSE_WAIT: Duration = Duration::from_millis(300);

/// How long after a planned move the app's calls are carried over (see [`Driver::carried`])
/// rather than failed: the new leader of a moved group is elected and serving well within it.
const CARRY_FOR: Duration = Duration::from_secs(10);

/// A call the app makes while the client waits to reconnect brings the next attempt forward to
/// this long after the wait began: an app in use is served again soon after its node is back,
/// not only when a backoff grown to 30 s runs out. Attempts stay as frequent as the app's
/// calls at most, and the backoff still grows.
pub const EARLY_ATTEMPT_AFTER: Duration = Duration::from_secs(2);

/// A request written and not yet answered.
struct Pending {
    request: Request,
    reply: oneshot::Sender<Result<Response, ClientError>>,
    permit: Option<OwnedSemaphorePermit>,
    sent: Instant,
}

/// A call carried across a planned move (see [`Driver::carried`]).
struct Carried {
    request: Request,
    reply: oneshot::Sender<Result<Response, ClientError>>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Why the connected loop ended.
enum Exit {
    /// The app closed the client (or dropped every handle).
    Closed(Option<oneshot::Sender<()>>),
    /// The connection is gone: reconnect to `target` (if any) after `after` (if given),
    /// trying `silent` (a node that stopped answering) last.
    Lost {
        reason: ClientError,
        after: Option<Duration>,
        target: Option<String>,
        silent: Option<String>,
        /// The node announced it (a drain, a moved group, a shutdown): the calls in flight
        /// and those made until the client is back are carried over, not failed.
        planned: bool,
    },
}

/// The background task that owns the connection. See the module documentation.
struct Driver {
    links: Arc<Mutex<Links>>,
    live: Option<Live>,
    pending: HashMap<RequestId, Pending>,
    /// Calls carried across a planned move: sent again once the client is back (a location
    /// update is answered by the resumed session's instead: only the newest position matters).
    carried: Vec<Carried>,
    next_id: RequestId,
    last_location: Option<Coord>,
    /// The app listens to strangers (the page size it asked for): a resumed session asks again.
    strangers: Option<Option<u16>>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SdkEvent>,
    session: watch::Sender<SessionInfo>,
    slots: Arc<Semaphore>,
    dialer: Dialer,
    config: ClientConfig,
}

impl Driver {
    /// Serves commands over `link`, reconnecting as needed, until closed or it gives up.
    async fn run(mut self, link: Link) {
        self.attach(link);
        let end = loop {
            match self.serve().await {
                Exit::Closed(ack) => break (ClientError::Closed, ack),
                Exit::Lost {
                    reason,
                    after,
                    target,
                    silent,
                    planned,
                } => {
                    tracing::info!(%reason, planned, "connection lost; reconnecting");
                    if planned {
                        self.carry_pending();
                    }
                    self.detach(&reason);
                    match self.reconnect(reason, after, target, silent, planned).await {
                        Ok(()) => continue,
                        Err(end) => break end,
                    }
                }
            }
        };
        let (error, ack) = end;
        self.fail_pending(&ClientError::Closed);
        for c in self.carried.drain(..) {
            let _ = c.reply.send(Err(error.clone()));
        }
        if let Some(live) = self.live.take() {
            live.close_gracefully("client closed").await;
        }
        self.slots.close();
        let _ = self.events.try_send(SdkEvent::Closed(error));
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }

    /// Takes over a fresh link: spawns its readers.
    fn attach(&mut self, link: Link) {
        let Link {
            endpoint,
            owned,
            conn,
            send,
            recv,
            addr,
        } = link;
        let (responses_tx, responses) = mpsc::channel(self.config.max_in_flight + 2);
        let (shutdown_tx, shutdown) = mpsc::channel(1);
        let reader = tokio::spawn(read_responses(recv, responses_tx));
        let pusher = tokio::spawn(read_events(conn.clone(), self.events.clone(), shutdown_tx));
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(Some(conn.clone()));
        self.live = Some(Live {
            endpoint,
            owned,
            conn,
            send,
            addr,
            responses,
            shutdown,
            shutdown_open: true,
            tasks: [reader, pusher],
        });
    }

    /// Forgets the current link and fails every call in flight.
    fn detach(&mut self, reason: &ClientError) {
        if let Some(live) = self.live.take() {
            live.conn.close(quinn::VarInt::from_u32(0), b"reconnecting");
        }
        let lost = match reason {
            ClientError::ConnectionLost { .. } => reason.clone(),
            other => ClientError::ConnectionLost {
                reason: other.to_string(),
            },
        };
        self.fail_pending(&lost);
    }

    /// Moves the calls in flight to [`Driver::carried`], oldest first.
    fn carry_pending(&mut self) {
        let mut pending: Vec<(RequestId, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        self.carried.extend(pending.into_iter().map(|(_, p)| Carried {
            request: p.request,
            reply: p.reply,
            permit: p.permit,
        }));
    }

    /// Once the client is back after a planned move: answers the carried location updates with
    /// the resumed session's answer (`resumed`), and sends the other carried calls again.
    async fn send_carried(&mut self, resumed: Option<&Response>) -> Result<(), ClientError> {
        let mut carried = std::mem::take(&mut self.carried).into_iter();
        while let Some(c) = carried.next() {
            match (&c.request, resumed) {
                (
                    Request::UpdateLocation { .. },
                    Some(answer @ (Response::Started { .. } | Response::Located { .. })),
                ) => {
                    let _ = c.reply.send(Ok(answer.clone()));
                }
                _ => {
                    if let Err(e) = self.send(c.request, c.reply, c.permit).await {
                        // The new link broke too: what was not sent yet waits for the next.
                        self.carried.extend(carried);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn fail_pending(&mut self, error: &ClientError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(error.clone()));
        }
    }

    /// The connected loop: writes requests, delivers responses, watches for the end.
    async fn serve(&mut self) -> Exit {
        loop {
            let Some(live) = self.live.as_mut() else {
                return self.lost(connection::lost("no connection"), None, None);
            };
            // The oldest unanswered request bounds how long a silent node is trusted.
            let overdue = self
                .pending
                .values()
                .map(|p| p.sent + answer_within(&p.request, self.config.request_timeout))
                .min()
                .map(tokio::time::Instant::from_std);
            let step = tokio::select! {
                biased;
                response = live.responses.recv() => Step::Response(response),
                notice = live.shutdown.recv(), if live.shutdown_open => Step::Shutdown(notice),
                command = self.commands.recv() => Step::Command(command),
                () = sleep_until(overdue) => Step::Overdue,
            };
            match step {
                Step::Response(Some(Ok(frame))) => self.deliver(frame),
                Step::Response(Some(Err(reason))) => {
                    self.await_close().await;
                    return self.lost(reason, None, None);
                }
                Step::Response(None) => {
                    self.await_close().await;
                    return self.lost(connection::lost("the node closed the control stream"), None, None);
                }
                Step::Shutdown(Some(notice)) => {
                    tracing::info!(after = ?notice.after, redirect = ?notice.redirect, "node shutting down");
                    let mut exit = self.lost(
                        connection::lost("the node is shutting down"),
                        Some(notice.after),
                        notice.redirect,
                    );
                    if let Exit::Lost { planned, .. } = &mut exit {
                        *planned = true;
                    }
                    return exit;
                }
                // The event task ended; the control stream tells whether the connection is gone.
                Step::Shutdown(None) => {
                    if let Some(live) = self.live.as_mut() {
                        live.shutdown_open = false;
                    }
                }
                Step::Overdue => {
                    let after_ms = u64::try_from(self.config.request_timeout.as_millis()).unwrap_or(u64::MAX);
                    let oldest = self
                        .pending
                        .values()
                        .min_by_key(|p| p.sent)
                        .map(|p| request_name(&p.request));
                    let addr = self.live.as_ref().map(|l| l.addr.clone());
                    tracing::info!(after_ms, request = ?oldest, ?addr, "a request went unanswered; the node is taken for gone");
                    // Not back to the silent node: the configured ones redirect as needed.
                    return Exit::Lost {
                        reason: ClientError::Timeout {
                            during: "waiting for an answer",
                            after_ms,
                        },
                        after: None,
                        target: None,
                        silent: self.live.as_ref().map(|l| l.addr.clone()),
                        planned: false,
                    };
                }
                Step::Command(None) => return Exit::Closed(None),
                Step::Command(Some(Command::Close(ack))) => return Exit::Closed(Some(ack)),
                Step::Command(Some(Command::Request {
                    request,
                    reply,
                    permit,
                })) => {
                    if let Err(reason) = self.send(request, reply, Some(permit)).await {
                        self.await_close().await;
                        return self.lost(reason, None, None);
                    }
                }
            }
        }
    }

    /// The control stream ended: waits (briefly) for the connection's close, which says — with
    /// the node's notice, read by the event task meanwhile — whether the node moved the session
    /// on purpose (see [`Driver::lost`]).
    async fn await_close(&mut self) {
        if let Some(live) = self.live.as_ref() {
            let _ = tokio::time::timeout(CLOSE_WAIT, live.conn.closed()).await;
        }
    }

    fn lost(&mut self, reason: ClientError, after: Option<Duration>, target: Option<String>) -> Exit {
        if let Some(live) = self.live.as_mut() {
            // The node's notice may have been read while the connection's close raced it; or
            // the close says what the notice would have (a node closes a session it moves, or
            // stops serving, with code 0 and the reason): either way the move is planned.
            let planned = match live.shutdown.try_recv() {
                Ok(notice) => Some((Some(notice.after), notice.redirect)),
                Err(_) => match live.conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code.into_inner() == 0 => {
                        let text = String::from_utf8_lossy(&c.reason);
                        match text.strip_prefix("moved") {
                            Some(rest) => Some((after, rest.strip_prefix(" to ").map(str::to_string))),
                            None if text == "node shutting down" => Some((after, None)),
                            None => None,
                        }
                    }
                    _ => None,
                },
            };
            if let Some((after, redirect)) = planned {
                return Exit::Lost {
                    reason,
                    after,
                    target: redirect.or(target),
                    silent: None,
                    planned: true,
                };
            }
        }
        // A connection that timed out idle means the node went silent (dead, or cut off): it is
        // tried last, like one that left a request unanswered.
        if let Some(live) = self.live.as_ref() {
            if matches!(live.conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
                tracing::info!(addr = %live.addr, "the node went silent; trying the others first");
                return Exit::Lost {
                    reason,
                    after,
                    target: None,
                    silent: Some(live.addr.clone()),
                    planned: false,
                };
            }
        }
        let target = target.or_else(|| self.live.as_ref().map(|l| l.addr.clone()));
        Exit::Lost {
            reason,
            after,
            target,
            silent: None,
            planned: false,
        }
    }

    /// Writes one request and keeps its reply slot.
    async fn send(
        &mut self,
        request: Request,
        reply: oneshot::Sender<Result<Response, ClientError>>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<RequestId, ClientError> {
        let Some(live) = self.live.as_mut() else {
            let _ = reply.send(Err(ClientError::Reconnecting));
            return Err(connection::lost("no connection"));
        };
        let id = self.next_id;
        self.next_id += 1;
        let kept = request.clone();
        if let Request::UpdateLocation { at } = &request {
            self.last_location = Some(*at);
        }
        if let Request::ListStrangers { page_size } = &request {
            self.strangers = Some(*page_size);
        }
        // Reconnections authenticate with the newest token.
        if let Request::Renew { token } = &request {
            self.config.token = token.clone();
        }
        let frame = RequestFrame { id, request };
        let written = match connection::write_request(&mut live.send, &frame).await {
            Err(ClientError::Protocol(msg)) => {
                // The request itself cannot be encoded (e.g. over the frame limit): only this
                // call fails; the connection is fine.
                let _ = reply.send(Err(ClientError::Protocol(msg)));
                return Ok(id);
            }
            written => written,
        };
        // Written, or the connection broke under the write: either way the call is in flight,
        // and goes wherever the calls in flight go (answered, failed, or carried over a
        // planned move).
        self.pending.insert(
            id,
            Pending {
                request: kept,
                reply,
                permit,
                sent: Instant::now(),
            },
        );
        written.map(|()| id)
    }

    fn deliver(&mut self, frame: ResponseFrame) {
        match self.pending.remove(&frame.id) {
            Some(p) => {
                let _ = p.reply.send(Ok(frame.response));
            }
            None => tracing::warn!(id = frame.id, "response to no request in flight; ignored"),
        }
    }

    /// Reconnects with backoff, then resumes. `Err` carries why the client stops.
    async fn reconnect(
        &mut self,
        mut reason: ClientError,
        mut first_delay: Option<Duration>,
        preferred: Option<String>,
        silent: Option<String>,
        planned: bool,
    ) -> Result<(), (ClientError, Option<oneshot::Sender<()>>)> {
        let mut attempt: u32 = 0;
        let carry_until = Instant::now() + CARRY_FOR;
        // The node that went silent is tried last.
        let avoid: HashSet<String> = silent.into_iter().collect();
        loop {
            if !self.config.reconnect.allows(attempt) {
                tracing::warn!(attempts = attempt, %reason, "giving up reconnecting");
                return Err((reason, None));
            }
            let after = first_delay
                .take()
                .unwrap_or_else(|| self.config.reconnect.delay(attempt));
            // A planned move carries the app's calls over for a while; past it, it is an
            // outage like any other, and the carried calls fail.
            let carrying = planned && Instant::now() + after < carry_until;
            let _ = self.events.try_send(SdkEvent::Reconnecting {
                attempt: attempt + 1,
                after,
                reason: reason.clone(),
                planned: carrying,
            });
            if !carrying {
                for c in self.carried.drain(..) {
                    let _ = c.reply.send(Err(ClientError::Reconnecting));
                }
            }
            if let Some(ack) = self.wait_for_link(after, carrying).await {
                return Err((ClientError::Closed, ack));
            }
            // Alternate between the preferred node (the one that was serving us, or the one a
            // shutdown named) and the configured endpoints, tried in turn from a different one
            // each time, which redirect as needed: a dead node must not trap the client.
            let dialed = match preferred.as_deref() {
                Some(addr) if attempt.is_multiple_of(2) => hello(&self.dialer, &self.config, addr).await,
                _ => hello_any(&self.dialer, &self.config, (attempt / 2) as usize, &avoid).await,
            };
            attempt += 1;
            match dialed {
                Ok((link, info)) => {
                    tracing::info!(addr = %link.addr, attempt, "reconnected");
                    self.session.send_replace(info);
                    self.attach(link);
                    let resumed = match self.resume().await {
                        Ok((page, answer)) => match self.send_carried(answer.as_ref()).await {
                            Ok(()) => Ok(page),
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    match resumed {
                        Ok(page) => {
                            let _ = self.events.try_send(SdkEvent::Resumed { page });
                            return Ok(());
                        }
                        Err(e) => {
                            self.detach(&e);
                            if is_fatal(&e) {
                                return Err((e, None));
                            }
                            reason = e;
                        }
                    }
                }
                Err(e) if is_fatal(&e) => return Err((e, None)),
                Err(e) => reason = e,
            }
        }
    }

    /// Sleeps `after`. Every call made meanwhile fails with [`ClientError::Reconnecting`] —
    /// or, `carrying` (a planned move), waits in [`Driver::carried`] for the next link (a
    /// location update becomes the one the session resumes with). Returns `Some` if the app
    /// closed the client while waiting.
    async fn wait_for_link(
        &mut self,
        after: Duration,
        carrying: bool,
    ) -> Option<Option<oneshot::Sender<()>>> {
        let began = tokio::time::Instant::now();
        let sleep = tokio::time::sleep(after);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return None,
                command = self.commands.recv() => match command {
                    None => return Some(None),
                    Some(Command::Close(ack)) => return Some(Some(ack)),
                    Some(Command::Request { request, reply, permit }) => {
                        // The app is in use: the next attempt comes soon.
                        let early = began + EARLY_ATTEMPT_AFTER;
                        if sleep.deadline() > early {
                            sleep.as_mut().reset(early);
                        }
                        if !carrying {
                            let _ = reply.send(Err(ClientError::Reconnecting));
                            continue;
                        }
                        if let Request::UpdateLocation { at } = &request {
                            self.last_location = Some(*at);
                        }
                        self.carried.push(Carried {
                            request,
                            reply,
                            permit: Some(permit),
                        });
                    }
                },
            }
        }
    }

    /// Re-sends the last location, if any; returns the fresh first page and the node's answer
    /// to that location (what carried location updates are answered with).
    async fn resume(&mut self) -> Result<(Option<NearbyPage>, Option<Response>), ClientError> {
        let (page, answer) = self.resume_location().await?;
        // Listening to strangers belongs to the session: listen again on the new one.
        if let (Some(page_size), Some(_)) = (self.strangers, &page) {
            match self.roundtrip(Request::ListStrangers { page_size }).await? {
                Response::Strangers(_) => {}
                other => tracing::warn!(?other, "strangers not listened to again after resuming"),
            }
        }
        Ok((page, answer))
    }

    async fn resume_location(&mut self) -> Result<(Option<NearbyPage>, Option<Response>), ClientError> {
        let Some(at) = self.last_location else {
            return Ok((None, None));
        };
        let answer = self.roundtrip(Request::UpdateLocation { at }).await?;
        let page = self.first_page(&answer).await?;
        Ok((page, Some(answer)))
    }

    /// The first page of a resumed session, from the node's answer to its location.
    async fn first_page(&mut self, answer: &Response) -> Result<Option<NearbyPage>, ClientError> {
        match answer.clone() {
            Response::Started { page, .. } => Ok(Some(page)),
            // The node still held a live location: the session already runs; ask for the page.
            Response::Located { .. } => match self
                .roundtrip(Request::ListNearby {
                    cursor: None,
                    page_size: None,
                })
                .await?
            {
                Response::Nearby(page) => Ok(Some(page)),
                other => {
                    tracing::warn!(?other, "no first page after resuming");
                    Ok(None)
                }
            },
            Response::Error(body) if !is_fatal(&ClientError::Server(body.clone())) => {
                tracing::warn!(%body, "the node refused the resumed location");
                Ok(None)
            }
            other => Err(unexpected("UpdateLocation", other)),
        }
    }

    /// One request of the driver's own, answered before any app call is served.
    async fn roundtrip(&mut self, request: Request) -> Result<Response, ClientError> {
        let (reply, answer) = oneshot::channel();
        let id = self.send(request, reply, None).await?;
        let timeout = self.config.connect_timeout;
        let wait = async {
            loop {
                let Some(live) = self.live.as_mut() else {
                    return Err(connection::lost("no connection"));
                };
                match live.responses.recv().await {
                    Some(Ok(frame)) => {
                        let done = frame.id == id;
                        self.deliver(frame);
                        if done {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err(connection::lost("the node closed the control stream")),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout {
                during: "resuming the session",
                after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            })??;
        answer.await.map_err(|_| ClientError::Closed)?
    }
}

/// Errors after which reconnecting cannot help: the node refused *who* we are or *how* we
/// speak, or the configuration is wrong.
fn is_fatal(e: &ClientError) -> bool {
    match e {
        ClientError::Server(body) => !e.is_retryable() && body.code != crate::proto::ErrorCode::NotStarted,
        ClientError::Config(_) | ClientError::Protocol(_) | ClientError::Closed => true,
        _ => false,
    }
}

/// Reads responses from the control stream until it ends or fails.
async fn read_responses(mut recv: FrameReader, out: mpsc::Sender<Result<ResponseFrame, ClientError>>) {
    loop {
        let item = match recv.next::<ResponseFrame>().await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(connection::lost("the node closed the control stream")),
            Err(e) => Err(e),
        };
        let end = item.is_err();
        if out.send(item).await.is_err() || end {
            return;
        }
    }
}

/// Reads the node's event stream into the app's channel; reports shutdown notices to the
/// driver. Waits for the app when its channel is full (backpressure to the node).
async fn read_events(
    conn: quinn::Connection,
    app: mpsc::Sender<SdkEvent>,
    shutdown: mpsc::Sender<ShutdownNotice>,
) {
    let stream = match conn.accept_uni().await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%e, "no event stream");
            return;
        }
    };
    let mut reader = FrameReader::new(stream);
    loop {
        let event = match reader.next::<Event>().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%e, "event stream ended");
                return;
            }
        };
        if let Event::Shutdown {
            reconnect_after_ms,
            redirect,
        } = &event
        {
            let _ = shutdown.try_send(ShutdownNotice {
                after: Duration::from_millis(u64::from(*reconnect_after_ms)),
                redirect: redirect.clone(),
            });
        }
        // An app that dropped its receiver discards events; keep reading for shutdowns.
        let _ = app.send(SdkEvent::Event(event)).await;
    }
}
