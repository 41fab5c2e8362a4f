//! nearby's own client-service driver: one task owns the UDP socket and every connection on it,
//! as quinn-proto state machines, and wakes once per batch of work rather than once per packet.
//!
//! ```text
//!            recvmmsg (GRO)                                  sendmmsg (GSO)
//!  socket ───────────────▶ Endpoint::handle ─▶ Connection ─▶ poll_transmit ─▶ Batch ──▶ socket
//!                                               │   ▲
//!                requests (one in flight each) ─┘   └─ events: queues ring the Doorbell,
//!                run as futures in this task           drained into their streams per wake-up
//! ```
//!
//! What quinn does with a task, a channel and a transmit buffer per connection, this does with
//! none: a connection is its `quinn_proto::Connection`, its session ([`super::session`]), its
//! frame buffer and at most one encoded event waiting for flow control. Per wake-up the driver
//! takes whatever is ready — datagrams (up to [`RECV_ROUNDS`] `recvmmsg` calls), answered
//! requests, sessions whose event queues rang, expired timers — then polls every connection it
//! touched for packets and sends them all in as few `sendmmsg` calls as the kernel takes. The
//! events of one session that arrive together leave in one packet.
//!
//! Requests run as futures inside this task (one in flight per connection, as the protocol
//! says); the session's state moves into the future and comes back with the answer. A session
//! whose request is in flight is not read from: its client's further frames wait in quinn-proto's
//! stream buffer, bounded by the stream's receive window.
//!
//! A revocation that reaches a session (a friend hid, unfriended, left) is acknowledged to its
//! author only once the client has acknowledged every byte its connection carried before it —
//! a delivery fence ([`crate::queue`]): the session's events wait meanwhile, and a client that
//! does not acknowledge within [`FENCE_WAIT`] loses its connection (what was on its way is not
//! sent again), so nothing the revocation forbids can arrive after the author was told.
//!
//! A connection also follows the lease of the group whose driver let its events out
//! ([`crate::queue::DeliveryLease`]): shortly after the lease ends no more events are written,
//! and a connection whose client has not acknowledged what it carries by
//! [`DELIVERY_BOUND`](crate::queue::DELIVERY_BOUND) after the end is closed — a deposed leader's
//! sessions stop before a new leader may acknowledge revocations, even after a pause. That bound
//! is the lease's, so the driver keeps one deadline per lease, not one per connection
//! ([`leases`]).
//!
//! New connections pass the [`guard`] first: per-address limits on connections and handshakes,
//! and a QUIC Retry for unvalidated addresses during a handshake flood.
//!
//! Known limits: the socket's source address is not set per packet (bind the service to a
//! specific address on a multi-homed host).

mod guard;
mod leases;
pub mod udp;

pub use guard::AbuseLimits;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use nearby_client::proto::{frame, Event as PushEvent, FrameBuffer, RequestFrame, Response};
use nearby_index::geo::UserId;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Event, ReadError, StreamEvent, StreamId, VarInt,
    WriteError,
};

use crate::api::Backend;
use crate::metrics::ServiceMetrics;
use crate::queue::{
    CloseReason, DeliveryLease, Doorbell, EventQueue, LeaseClock, Popped, DELIVERY_BOUND, WRITE_AFTER_LEASE,
};
use crate::service::session::{
    bad_frame, encode_response, goodbye, since_taken, Context, Goodbye, Session, BAD_FRAME_LINGER,
    CLOSE_DONE, CLOSE_PROTOCOL, CLOSE_SLOW, GOODBYE_LINGER,
};

/// `recvmmsg` calls per wake-up before the driver sends what it has and looks at its other work.
pub(crate) const RECV_ROUNDS: usize = 8;
/// GSO segments per transmit at most (quinn's own cap).
const MAX_SEGMENTS: usize = 10;
/// The least a connection may hold unacknowledged (see [`Conn::fit_send_window`]), bytes.
const MIN_SEND_WINDOW: u64 = 4 * 1024;
/// How long a delivery fence waits for the client's acknowledgements before the connection is
/// closed (see the module doc): a few round trips of a poor mobile link (a lost packet sent
/// again), within the author's wait ([`crate::group::driver::ACK_WAIT`]). A second closed too
/// many connections of a starved load generator at 5-node overload (each close a reconnection
/// that adds load).
pub(crate) const FENCE_WAIT: Duration = Duration::from_secs(2);
/// How long a stopping service waits for its clients to take their goodbyes.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// A bound socket and the QUIC server configuration, before the layer behind the service exists.
pub(crate) struct Bound {
    socket: std::net::UdpSocket,
    config: Arc<quinn_proto::ServerConfig>,
    limits: AbuseLimits,
}

impl Bound {
    /// Binds `addr` (with the service's socket buffers) for `config`, to admit connections
    /// within `limits`.
    pub(crate) fn bind(
        addr: SocketAddr,
        config: quinn::ServerConfig,
        limits: AbuseLimits,
    ) -> io::Result<Bound> {
        let socket: std::net::UdpSocket = super::bind_socket(addr)?.into();
        socket.set_nonblocking(true)?;
        Ok(Bound {
            socket,
            config: Arc::new(config),
            limits,
        })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Serves connections on `bound` until `shutdown`; then tells every session to go, waits up to
/// [`STOP_WAIT`] for them, and closes what is left.
pub(crate) async fn run<B: Backend>(
    bound: Bound,
    ctx: Arc<Context<B>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut driver = Driver::new(bound, ctx)?;
    let socket = Arc::clone(&driver.socket);
    let bell = Arc::clone(&driver.bell);
    let mut requests: FuturesUnordered<Pending<B>> = FuturesUnordered::new();
    let mut stop: Option<Stop> = None;
    tokio::pin!(shutdown);
    loop {
        let next = driver
            .next_deadline()
            .into_iter()
            .chain(stop.as_ref().map(|s| s.at))
            .min();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let work = tokio::select! {
            biased;
            () = &mut shutdown, if stop.is_none() => {
                tracing::info!(sessions = driver.open(), "client service stopping; telling sessions to reconnect");
                driver.accepting = false;
                driver.ctx.core.close_all(CloseReason::Shutdown);
                stop = Some(Stop { at: Instant::now() + STOP_WAIT, forced: false });
                false
            }
            readable = socket.readable() => {
                readable?;
                true
            }
            Some(done) = requests.next(), if !requests.is_empty() => {
                driver.answered(done);
                true
            }
            () = bell.rung() => true,
            () = sleep => false,
        };
        if work {
            // The first sign of work lets the tasks that are ready run first (the group drivers
            // fanning an update out): the turn then takes every event they queued at once.
            tokio::task::yield_now().await;
        }
        let now = Instant::now();
        driver.receive(now);
        while let Some(Some(done)) = requests.next().now_or_never() {
            driver.answered(done);
        }
        driver.ring();
        driver.expire(now);
        driver.flush(now).await?;
        requests.extend(driver.started.drain(..));
        if let Some(s) = &mut stop {
            if driver.open() == 0 {
                break;
            }
            if now >= s.at {
                if s.forced {
                    tracing::info!(
                        left = driver.open(),
                        "client service stopped with connections still draining"
                    );
                    break;
                }
                driver.close_all(now);
                driver.flush(now).await?;
                *s = Stop {
                    at: now + Duration::from_secs(1),
                    forced: true,
                };
            }
        }
    }
    Ok(())
}

/// A stopping service's deadline: for its sessions' goodbyes, then (`forced`) for the closes.
struct Stop {
    at: Instant,
    forced: bool,
}

/// A request's answer, back from its future: where it goes, its id, and the session.
type Answered<B> = (Key, u64, Box<Session<B>>, Option<Response>);
type Pending<B> = Pin<Box<dyn Future<Output = Answered<B>> + Send>>;

/// A connection's slot (its quinn-proto handle) and a tag that tells it from an earlier
/// connection in the same slot; packed in a `u64` for the [`Doorbell`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key(u64);

impl Key {
    fn new(slot: usize, tag: u32) -> Key {
        Key((u64::from(tag) << 32) | slot as u64)
    }

    fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn tag(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

struct Driver<B: Backend> {
    ctx: Arc<Context<B>>,
    socket: Arc<tokio::net::UdpSocket>,
    udp: Arc<quinn_udp::UdpSocketState>,
    endpoint: quinn_proto::Endpoint,
    /// Connections by their quinn-proto handle (a dense index).
    conns: Vec<Option<Conn<B>>>,
    live: usize,
    next_tag: u32,
    /// Every connection's next deadline; entries a connection moved away from are skipped.
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// The delivery leases the connections write under: their bounds, one deadline per lease.
    leases: leases::LeaseWatch,
    /// The earliest of their bounds, as of the last [`Driver::next_deadline`].
    lease_deadline: Option<Instant>,
    /// Leases that ran out, while their connections are checked.
    lapsed: Vec<Arc<DeliveryLease>>,
    /// Connections touched since the last flush.
    dirty: Vec<usize>,
    bell: Arc<Doorbell>,
    rang: Vec<u64>,
    /// Requests taken since the last turn, to join the running ones.
    started: Vec<Pending<B>>,
    batch: udp::Batch,
    /// quinn-proto writes each transmit here before it joins the batch.
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    segments: usize,
    accepting: bool,
    guard: guard::Guard,
}

impl<B: Backend> Driver<B> {
    fn new(bound: Bound, ctx: Arc<Context<B>>) -> io::Result<Self> {
        let limits = bound.limits;
        let udp = Arc::new(quinn_udp::UdpSocketState::new((&bound.socket).into())?);
        let socket = Arc::new(tokio::net::UdpSocket::from_std(bound.socket)?);
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            Some(bound.config),
            !udp.may_fragment(),
            None,
        );
        let segments = udp.max_gso_segments().clamp(1, MAX_SEGMENTS);
        Ok(Driver {
            ctx,
            socket,
            recv_buf: vec![0; udp::RECV_SLOT * quinn_udp::BATCH_SIZE],
            udp,
            endpoint,
            conns: Vec::new(),
            live: 0,
            next_tag: 0,
            timers: BinaryHeap::new(),
            leases: leases::LeaseWatch::default(),
            lease_deadline: None,
            lapsed: Vec::new(),
            dirty: Vec::new(),
            bell: Arc::default(),
            rang: Vec::new(),
            started: Vec::new(),
            batch: udp::Batch::default(),
            scratch: Vec::new(),
            segments,
            accepting: true,
            guard: guard::Guard::new(limits),
        })
    }

    /// Connections not yet drained.
    fn open(&self) -> usize {
        self.live
    }

    fn conn(&mut self, key: Key) -> Option<&mut Conn<B>> {
        self.conns
            .get_mut(key.slot())
            .and_then(|c| c.as_mut())
            .filter(|c| c.tag == key.tag())
    }

    fn touch(&mut self, slot: usize) {
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Reads datagrams until the socket is empty or [`RECV_ROUNDS`] calls are done.
    fn receive(&mut self, now: Instant) {
        let (socket, state) = (Arc::clone(&self.socket), Arc::clone(&self.udp));
        let mut buf = std::mem::take(&mut self.recv_buf);
        udp::receive(&socket, &state, &mut buf, RECV_ROUNDS, |meta, datagram| {
            self.datagram(now, meta, BytesMut::from(datagram));
        });
        self.recv_buf = buf;
    }

    fn datagram(&mut self, now: Instant, meta: &quinn_udp::RecvMeta, data: BytesMut) {
        self.scratch.clear();
        let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
        match self
            .endpoint
            .handle(now, meta.addr, meta.dst_ip, ecn, data, &mut self.scratch)
        {
            Some(DatagramEvent::NewConnection(incoming)) => self.accept(incoming, now),
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(Some(c)) = self.conns.get_mut(handle.0) {
                    c.q.handle_event(event);
                    self.touch(handle.0);
                }
            }
            Some(DatagramEvent::Response(t)) => self.batch.push_transmit(&t, &self.scratch),
            None => {}
        }
    }

    fn accept(&mut self, mut incoming: quinn_proto::Incoming, now: Instant) {
        self.scratch.clear();
        let ip = incoming.remote_address().ip().to_canonical();
        if self.accepting {
            let validated = incoming.remote_address_validated();
            match self.guard.judge(ip, validated, incoming.may_retry()) {
                guard::Verdict::Accept => {}
                guard::Verdict::Retry => match self.endpoint.retry(incoming, &mut self.scratch) {
                    Ok(t) => {
                        self.ctx.metrics.retried();
                        self.batch.push_transmit(&t, &self.scratch);
                        return;
                    }
                    Err(e) => {
                        self.scratch.clear();
                        incoming = e.into_incoming();
                    }
                },
                guard::Verdict::Refuse(why) => {
                    tracing::debug!(%ip, why, "connection refused");
                    self.ctx.metrics.refused_by_address();
                    let t = self.endpoint.refuse(incoming, &mut self.scratch);
                    self.batch.push_transmit(&t, &self.scratch);
                    return;
                }
            }
        }
        let count = if self.accepting { self.ctx.admit() } else { None };
        let Some(count) = count else {
            let t = self.endpoint.refuse(incoming, &mut self.scratch);
            self.batch.push_transmit(&t, &self.scratch);
            return;
        };
        match self.endpoint.accept(incoming, now, &mut self.scratch, None) {
            Ok((handle, q)) => {
                let slot = handle.0;
                if self.conns.len() <= slot {
                    self.conns.resize_with(slot + 1, || None);
                }
                self.next_tag = self.next_tag.wrapping_add(1);
                let hello_by = tokio::time::Instant::now() + self.ctx.hello_timeout;
                let session = Box::new(Session::new(Arc::clone(&self.ctx), count, hello_by));
                self.conns[slot] = Some(Conn::new(
                    q,
                    self.next_tag,
                    session,
                    Arc::clone(&self.ctx.metrics),
                    ip,
                ));
                self.guard.opened(ip);
                self.live += 1;
                self.touch(slot);
            }
            Err(e) => {
                tracing::debug!(error = %e.cause, "handshake refused");
                if let Some(t) = e.response {
                    self.batch.push_transmit(&t, &self.scratch);
                }
            }
        }
    }

    /// A request's answer is back: the session returns to its connection, the answer goes out.
    fn answered(&mut self, (key, id, session, answer): Answered<B>) {
        let bell = Arc::clone(&self.bell);
        let Some(c) = self.conn(key).filter(|c| !c.ended) else {
            tokio::spawn(session.end());
            return;
        };
        let mut authenticated = None;
        if c.events.queue.is_none() {
            if let (Some(sink), Some(user)) = (session.sink(), session.user()) {
                sink.events.attach(bell, key.0);
                c.events.queue = Some(Arc::clone(&sink.events));
                c.events.user = user;
                authenticated = Some(c.ip);
            }
        }
        if let Some(response) = answer {
            encode_response(id, response, &mut c.control_out);
        }
        c.session_timer = timer_of(&session);
        c.session = Some(session);
        c.want_read = true;
        if let Some(ip) = authenticated {
            self.guard.authenticated(ip);
        }
        self.touch(key.slot());
    }

    /// Marks the sessions whose event queues rang.
    fn ring(&mut self) {
        self.bell.take(&mut self.rang);
        let rang = std::mem::take(&mut self.rang);
        for &key in &rang {
            let key = Key(key);
            if let Some(c) = self.conn(key) {
                c.events.wanted = true;
                self.touch(key.slot());
            }
        }
        self.rang = rang;
        self.rang.clear();
    }

    /// The earliest deadline of any connection or lease.
    fn next_deadline(&mut self) -> Option<Instant> {
        let mut conn = None;
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if self.conn(key).is_some_and(|c| c.scheduled == Some(at)) {
                conn = Some(at);
                break;
            }
            self.timers.pop();
        }
        self.lease_deadline = self.leases.next_deadline();
        conn.into_iter().chain(self.lease_deadline).min()
    }

    /// Fires every deadline that has passed.
    fn expire(&mut self, now: Instant) {
        let clock = LeaseClock::at(now);
        if self.lease_deadline.is_some_and(|at| at <= now) {
            self.leases.due(clock, &mut self.lapsed);
        }
        if !self.lapsed.is_empty() {
            // A lease ran out: its connections' clients must have what they were sent by now.
            for slot in 0..self.conns.len() {
                let Some(c) = self.conns[slot].as_mut() else {
                    continue;
                };
                let held = c.events.lease.as_ref();
                if held.is_some_and(|l| self.lapsed.iter().any(|d| Arc::ptr_eq(d, l)))
                    && c.lease_bound(now, clock)
                {
                    self.touch(slot);
                }
            }
            self.lapsed.clear();
        }
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conn(key).filter(|c| c.scheduled == Some(at)) else {
                continue;
            };
            c.scheduled = None;
            if !c.lease_bound(now, clock) {
                // Many entries fire early: the deadline they were set for has since moved later
                // (quinn's loss timer, cleared by the acknowledgement that came in time). Nothing
                // is due, so the entry is set again and the connection is not driven for nothing.
                if let Some(next) = c.next_deadline().filter(|&next| next > now) {
                    c.scheduled = Some(next);
                    self.timers.push(Reverse((next, key)));
                    continue;
                }
                c.on_timer(now);
            }
            self.touch(key.slot());
        }
    }

    /// Closes every connection (a stopping service whose clients did not leave in time).
    fn close_all(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns[slot].as_mut() {
                c.close(now, CLOSE_DONE, "shutdown");
                self.touch(slot);
            }
        }
    }

    /// Drives every touched connection and sends what they have to send.
    async fn flush(&mut self, now: Instant) -> io::Result<()> {
        let clock = LeaseClock::at(now);
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for &slot in &dirty {
                let Some(Some(c)) = self.conns.get_mut(slot) else {
                    continue;
                };
                c.dirty = false;
                let key = Key::new(slot, c.tag);
                let mut cx = Cx {
                    key,
                    now,
                    clock,
                    started: &mut self.started,
                };
                c.drive(&mut cx);
                if std::mem::take(&mut c.events.new_lease) {
                    if let Some(lease) = &c.events.lease {
                        self.leases.watch(lease);
                    }
                }
                let metrics = &self.ctx.metrics;
                self.batch
                    .take_transmits(
                        &mut c.q,
                        now,
                        self.segments,
                        &mut self.scratch,
                        &self.socket,
                        |n| metrics.sent(n),
                    )
                    .await?;
                let (drained, again) =
                    udp::endpoint_events(&mut self.endpoint, ConnectionHandle(slot), &mut c.q);
                c.dirty |= again;
                if drained {
                    if let Some(mut c) = self.conns[slot].take() {
                        self.guard.closed(c.ip, c.events.queue.is_some());
                        c.end();
                    }
                    self.live -= 1;
                    continue;
                }
                if c.dirty {
                    // An endpoint event came back: drive it again in the next round.
                    self.dirty.push(slot);
                }
                // Only an earlier deadline takes a new heap entry: most packets push quinn's
                // deadlines later (the idle timer), and a deadline that fires early finds nothing
                // due and is set again from the connection's state.
                if let Some(at) = c.next_deadline() {
                    if c.scheduled.is_none_or(|s| at < s) {
                        c.scheduled = Some(at);
                        self.timers.push(Reverse((at, key)));
                    }
                }
            }
        }
        if !self.batch.is_empty() {
            send(&self.socket, &mut self.batch, &self.ctx.metrics).await?;
        }
        Ok(())
    }
}

/// Sends the batch, waiting for room in the socket's buffer if it is full.
async fn send(
    socket: &tokio::net::UdpSocket,
    batch: &mut udp::Batch,
    metrics: &ServiceMetrics,
) -> io::Result<()> {
    udp::send_all(socket, batch, |n| metrics.sent(n)).await
}

/// When `session`'s timer next fires, on the driver's clock.
fn timer_of<B: Backend>(session: &Session<B>) -> Option<Instant> {
    session.next_timer().map(|t| t.into_std())
}

/// What a connection needs from its driver while it is driven.
struct Cx<'a, B: Backend> {
    key: Key,
    now: Instant,
    /// `now` on the delivery leases' clock.
    clock: LeaseClock,
    started: &'a mut Vec<Pending<B>>,
}

/// A close on its way: after the stream's data is acknowledged, or at `until`, whichever first.
struct Linger {
    until: Instant,
    stream: Option<StreamId>,
    code: u32,
    reason: String,
}

/// The event stream of an authenticated session.
#[derive(Default)]
struct Events {
    queue: Option<Arc<EventQueue>>,
    user: UserId,
    stream: Option<StreamId>,
    /// Encoded bytes the stream did not take yet (flow control).
    out: Vec<u8>,
    /// `out` holds (part of) an event, not only a goodbye.
    out_events: bool,
    /// The lease of the driver that let the events out (see the module doc).
    lease: Option<Arc<DeliveryLease>>,
    /// `lease` changed: the driver watches it ([`leases::LeaseWatch`]).
    new_lease: bool,
    /// Bytes were written to the connection since its client was last known to have them all.
    unsure: bool,
    /// The queue rang, or the stream has room again.
    wanted: bool,
    /// The queue's close was handled.
    closed: bool,
    /// Finish the stream once `out` is written (a goodbye).
    finish: bool,
    /// The client stopped the stream: nothing more is written.
    dead: bool,
    /// The revocations confirmed to the queue (see [`Conn::fence`]).
    fenced: u64,
    /// A fence waiting for the client's acknowledgements.
    fence: Option<Fencing>,
}

/// A delivery fence in progress: the revocations it covers and when the connection is closed if
/// the client has not acknowledged by then.
struct Fencing {
    mark: u64,
    until: Instant,
}

/// One client connection.
struct Conn<B: Backend> {
    q: quinn_proto::Connection,
    tag: u32,
    metrics: Arc<ServiceMetrics>,
    /// The session; `None` while a request is in flight (it is in the request's future).
    session: Option<Box<Session<B>>>,
    /// The session's next timer ([`Session::next_timer`]) as of when it last ran — it changes
    /// only then (a request answered, its timer fired). Kept here so that finding the
    /// connection's next deadline, after every packet, does not read the boxed session.
    session_timer: Option<Instant>,
    control: Option<StreamId>,
    frames: FrameBuffer,
    want_read: bool,
    /// The client finished its control stream.
    client_done: bool,
    /// Encoded responses the control stream did not take yet.
    control_out: Vec<u8>,
    finish_control: bool,
    events: Events,
    linger: Option<Linger>,
    /// The connection is closed (or lost): the session is over.
    ended: bool,
    /// The client's address, as the [`guard::Guard`] counts it.
    ip: std::net::IpAddr,
    scheduled: Option<Instant>,
    dirty: bool,
    /// The send window last given to quinn-proto (0: not yet).
    send_window: u64,
}

impl<B: Backend> Conn<B> {
    fn new(
        q: quinn_proto::Connection,
        tag: u32,
        session: Box<Session<B>>,
        metrics: Arc<ServiceMetrics>,
        ip: std::net::IpAddr,
    ) -> Self {
        Conn {
            q,
            ip,
            tag,
            metrics,
            session_timer: timer_of(&session),
            session: Some(session),
            control: None,
            frames: FrameBuffer::new(),
            want_read: false,
            client_done: false,
            control_out: Vec::new(),
            finish_control: false,
            events: Events::default(),
            linger: None,
            ended: false,
            scheduled: None,
            dirty: false,
            send_window: 0,
        }
    }

    /// Keeps what the connection holds unacknowledged — sent, or written and not yet sent — to
    /// its congestion window (at least [`MIN_SEND_WINDOW`], at most the transport's
    /// [`SEND_WINDOW`](crate::service::tls::SEND_WINDOW)): what congestion control lets it have
    /// in flight anyway, so nothing waits there longer than about a round trip. The rest of a
    /// session's events wait in its queue, where a revocation still reaches them (and, when it
    /// is full, a friend's newer position replaces a queued one); in quinn-proto's stream
    /// buffer they could not be recalled, and a congested client (loss, an overloaded node)
    /// would get them seconds after a change that forbids them was acknowledged. A congestion
    /// window that grows (acknowledgements) lets more in at once.
    fn fit_send_window(&mut self) {
        let want = self
            .q
            .congestion_state()
            .window()
            .clamp(MIN_SEND_WINDOW, crate::service::tls::SEND_WINDOW);
        if want != self.send_window {
            self.q.set_send_window(want);
            self.send_window = want;
        }
    }

    /// Handles quinn-proto's events, then moves the streams along.
    fn drive(&mut self, cx: &mut Cx<'_, B>) {
        while let Some(event) = self.q.poll() {
            match event {
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    if self.control.is_none() {
                        self.control = self.q.streams().accept(Dir::Bi);
                    }
                    self.want_read = true;
                }
                Event::Stream(StreamEvent::Readable { id }) if Some(id) == self.control => {
                    self.want_read = true
                }
                Event::Stream(StreamEvent::Writable { id }) if Some(id) == self.events.stream => {
                    self.events.wanted = true;
                }
                Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => self.events.wanted = true,
                Event::Stream(StreamEvent::Finished { id })
                    if self.linger.as_ref().is_some_and(|l| l.stream == Some(id)) =>
                {
                    if let Some(l) = self.linger.take() {
                        self.close(cx.now, l.code, &l.reason);
                    }
                }
                Event::Stream(StreamEvent::Stopped { id, .. }) if Some(id) == self.events.stream => {
                    self.events.dead = true;
                    self.events.wanted = true;
                    self.events.out.clear();
                }
                Event::ConnectionLost { reason } => {
                    tracing::debug!(user = ?self.user(), %reason, "connection lost");
                    self.end();
                }
                _ => {}
            }
        }
        if self.ended {
            return;
        }
        if self.lease_bound(cx.now, cx.clock) {
            return;
        }
        self.requests(cx);
        self.fit_send_window();
        self.write_control();
        self.fence(cx.now);
        self.write_events(cx.now, cx.clock);
        if self.events.fence.is_some() {
            // What the last writes added is part of what the fence waits for.
            self.fence(cx.now);
            if self.events.fence.is_none() {
                self.write_events(cx.now, cx.clock);
            }
        }
    }

    /// Moves the session's delivery fence along: starts one when a revocation reached the
    /// queue, and confirms it once the client has acknowledged everything written so far —
    /// events and answers alike, including the rest of any frame begun before it.
    fn fence(&mut self, now: Instant) {
        // Runs on every turn of the connection: no clone of the queue's `Arc` (its count shares
        // a cache line with the queue the group drivers push to from other threads).
        let Some(mark) = self.events.queue.as_ref().map(|q| q.revocations_seen()) else {
            return;
        };
        if mark > self.events.fenced {
            match &mut self.events.fence {
                Some(f) => f.mark = mark,
                None => {
                    self.events.fence = Some(Fencing {
                        mark,
                        until: now + FENCE_WAIT,
                    })
                }
            }
        }
        let Some(mark) = self.events.fence.as_ref().map(|f| f.mark) else {
            return;
        };
        if self.control_out.is_empty() && self.events.out.is_empty() && self.all_acknowledged() {
            self.events.unsure = false;
            if let Some(queue) = &self.events.queue {
                queue.fenced(mark);
            }
            self.metrics.fence_passed();
            self.events.fenced = mark;
            self.events.fence = None;
            self.events.wanted = true;
        }
    }

    /// Whether the lease the connection's events were let out under ended `after` before `now`.
    fn lease_passed(&self, now: LeaseClock, after: Duration) -> bool {
        self.events.lease.as_ref().is_some_and(|l| l.passed(now, after))
    }

    /// Whether events may still be written: until [`WRITE_AFTER_LEASE`] after the lease ends.
    fn may_write(&self, now: LeaseClock) -> bool {
        !self.lease_passed(now, WRITE_AFTER_LEASE)
    }

    /// Closes the connection (returns `true`) if its delivery bound ([`DELIVERY_BOUND`] after
    /// the end of its lease) has passed while its client may not have everything written to it:
    /// what a leader let out must not arrive after its successor may have acknowledged a
    /// revocation (see the module doc). Checked before anything is sent — after a pause too,
    /// when quinn-proto would send again what was lost — and when the driver's watch finds the
    /// lease ran out ([`leases::LeaseWatch`]).
    fn lease_bound(&mut self, now: Instant, clock: LeaseClock) -> bool {
        if self.ended || !self.events.unsure || !self.lease_passed(clock, DELIVERY_BOUND) {
            return false;
        }
        if self.all_acknowledged() {
            self.events.unsure = false;
            return false;
        }
        tracing::debug!(
            user = self.events.user,
            "closing a connection whose client did not acknowledge before its group's lease ended"
        );
        self.metrics.lease_closed();
        self.close(
            now,
            CLOSE_SLOW,
            "delivery not acknowledged before the lease ended",
        );
        true
    }

    /// Whether the client has acknowledged every byte written to the connection's streams.
    ///
    /// quinn-proto counts those bytes against the send window but does not tell the count: a
    /// write of nothing under a window of one byte is refused (`Blocked`) exactly while it is
    /// above zero (or while the client's flow control allows nothing more: a client that reads
    /// nothing cannot be told apart, and its fence runs out). An accepted empty write puts an
    /// empty STREAM frame on the wire, a few bytes once per fence. The driver's e2e tests show
    /// this holds for the quinn-proto in use.
    fn all_acknowledged(&mut self) -> bool {
        let Some(id) = self.events.stream.or(self.control) else {
            return true;
        };
        self.q.set_send_window(1);
        let probe = self.q.send_stream(id).write(&[]);
        self.q.set_send_window(self.send_window.max(MIN_SEND_WINDOW));
        matches!(probe, Ok(_) | Err(WriteError::Stopped(_)))
    }

    fn user(&self) -> Option<UserId> {
        self.events.queue.as_ref().map(|_| self.events.user)
    }

    /// Takes the next request if the session is free: from the frames read, else from the
    /// control stream.
    fn requests(&mut self, cx: &mut Cx<'_, B>) {
        while self.session.is_some() && self.linger.is_none() && !self.ended {
            match self.frames.next_frame::<RequestFrame>() {
                Ok(Some(f)) => {
                    self.frames.release_if_consumed();
                    let Some(mut session) = self.session.take() else {
                        return;
                    };
                    let key = cx.key;
                    cx.started.push(Box::pin(async move {
                        let answer = session.answer(f.request).await;
                        (key, f.id, session, answer)
                    }));
                    return;
                }
                Ok(None) if self.want_read && !self.client_done => self.read_control(),
                Ok(None) => {
                    if self.client_done {
                        // The client finished its control stream: the session is over once the
                        // last answers are out.
                        self.finish_then_close(cx.now, CLOSE_DONE, "bye");
                    }
                    return;
                }
                Err(e) => {
                    let (response, reason) = bad_frame(&e);
                    tracing::debug!(user = ?self.user(), error = %e, "closing a session that sent a malformed frame");
                    encode_response(0, response, &mut self.control_out);
                    self.finish_then_close(cx.now, CLOSE_PROTOCOL, reason);
                    if let Some(s) = self.session.take() {
                        tokio::spawn(s.end());
                    }
                    return;
                }
            }
        }
    }

    /// Finishes the control stream after what is written, and closes with `code` once the
    /// client acknowledged it — or after [`BAD_FRAME_LINGER`].
    fn finish_then_close(&mut self, now: Instant, code: u32, reason: &str) {
        self.finish_control = true;
        self.linger = Some(Linger {
            until: now + BAD_FRAME_LINGER,
            stream: self.control,
            code,
            reason: reason.to_string(),
        });
    }

    /// Moves what the control stream has into the frame buffer.
    fn read_control(&mut self) {
        self.want_read = false;
        let Some(id) = self.control else {
            return;
        };
        let mut stream = self.q.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else {
            self.client_done = true;
            return;
        };
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => self.frames.extend(&chunk.bytes),
                Ok(None) => {
                    self.client_done = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(code)) => {
                    tracing::debug!(code = %code, "the client reset its control stream");
                    self.client_done = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
    }

    fn write_control(&mut self) {
        let Some(id) = self.control else {
            return;
        };
        if !self.control_out.is_empty() {
            match self.q.send_stream(id).write(&self.control_out) {
                Ok(n) => {
                    self.control_out.drain(..n);
                    self.events.unsure |= n > 0;
                }
                Err(WriteError::Blocked) => {}
                Err(_) => self.control_out.clear(),
            }
        }
        if self.control_out.is_empty() {
            shrink(&mut self.control_out);
            if std::mem::take(&mut self.finish_control) {
                let _ = self.q.send_stream(id).finish();
            }
        }
    }

    /// Moves the session's queued events into its event stream, as far as flow control lets.
    fn write_events(&mut self, now: Instant, clock: LeaseClock) {
        if !self.events.wanted {
            return;
        }
        let Some(queue) = self.events.queue.clone() else {
            return;
        };
        if self.events.dead {
            // The client stopped the event stream: its events go nowhere, but a close of its
            // queue (moved, shut down) still ends the connection.
            self.events.wanted = false;
            while let Some(popped) = queue.try_pop() {
                if let Popped::Closed(reason) = popped {
                    self.goodbye(now, &reason);
                    break;
                }
            }
            return;
        }
        let id = match self.events.stream {
            Some(id) => id,
            None => match self.q.streams().open(Dir::Uni) {
                Some(id) => {
                    self.events.stream = Some(id);
                    id
                }
                // The client allows no stream yet: `Available` comes when it does.
                None => return,
            },
        };
        if let Some(lease) = queue.lease_if_not(self.events.lease.as_ref()) {
            self.events.lease = Some(lease);
            self.events.new_lease = true;
        }
        loop {
            if !self.events.out.is_empty() {
                if self.events.out_events && !self.may_write(clock) {
                    // The lease ended: held until it is renewed (a new event rings) or the
                    // session goes (its linger, or the delivery bound, closes it).
                    return;
                }
                match self.q.send_stream(id).write(&self.events.out) {
                    Ok(n) => {
                        self.events.out.drain(..n);
                        self.events.unsure |= n > 0;
                    }
                    Err(WriteError::Blocked) => {}
                    Err(_) => {
                        self.events.dead = true;
                        self.events.out.clear();
                        return;
                    }
                }
                if !self.events.out.is_empty() {
                    // A client that stops reading blocks the stream while its queue fills
                    // behind it; `Writable` resumes here — unless the queue gives up on the
                    // client first (it rings then).
                    if !self.events.closed && queue.is_closed() {
                        if let Some(Popped::Closed(reason)) = queue.try_pop() {
                            self.goodbye(now, &reason);
                        }
                    }
                    return;
                }
                shrink(&mut self.events.out);
                self.events.out_events = false;
            }
            if std::mem::take(&mut self.events.finish) {
                let _ = self.q.send_stream(id).finish();
                return;
            }
            if self.events.closed {
                self.events.wanted = false;
                return;
            }
            if self.events.fence.is_some() {
                // The queue waits until the client has what was written before the revocation
                // (`fence` asks for this again when it is confirmed).
                return;
            }
            if !self.may_write(clock) && !queue.is_closed() {
                // The lease ended: the queue waits for its renewal (a new event rings).
                self.events.wanted = false;
                return;
            }
            match queue.try_pop() {
                None => {
                    self.events.wanted = false;
                    return;
                }
                Some(Popped::Event(event)) => {
                    if let Err(e) = frame::encode(&event, &mut self.events.out) {
                        tracing::error!(user = self.events.user, error = %e, "cannot encode an event");
                        continue;
                    }
                    self.events.out_events = true;
                    self.metrics.pushed(since_taken(&event));
                }
                Some(Popped::Closed(reason)) => self.goodbye(now, &reason),
            }
        }
    }

    /// The session's queue closed for `reason` (handled once): a notice on the event stream if
    /// the client still reads it, else a close.
    fn goodbye(&mut self, now: Instant, reason: &CloseReason) {
        if std::mem::replace(&mut self.events.closed, true) {
            return;
        }
        match goodbye(self.events.user, reason, &self.metrics) {
            Goodbye::Quiet => {}
            Goodbye::Notice(bye, why) => match self.events.stream.filter(|_| !self.events.dead) {
                Some(stream) => self.say_goodbye(now, stream, &bye, why),
                None => self.close(now, CLOSE_DONE, &why),
            },
            Goodbye::Close(code, why) => self.close(now, code, &why),
        }
    }

    /// Writes `bye` as the stream's last event and closes once the client has it.
    fn say_goodbye(&mut self, now: Instant, stream: StreamId, bye: &PushEvent, why: String) {
        if frame::encode(bye, &mut self.events.out).is_ok() {
            self.events.finish = true;
        }
        // A client that stopped reading gets no more than this of our time.
        self.linger = Some(Linger {
            until: now + 2 * GOODBYE_LINGER,
            stream: Some(stream),
            code: CLOSE_DONE,
            reason: why,
        });
    }

    /// The connection's next deadline: quinn-proto's, the session's, a close's. (Its lease's
    /// bound is the driver's: [`leases::LeaseWatch`].)
    fn next_deadline(&mut self) -> Option<Instant> {
        let quic = self.q.poll_timeout();
        let linger = self.linger.as_ref().map(|l| l.until);
        let fence = self.events.fence.as_ref().map(|f| f.until);
        let session = match (&self.session, self.ended || self.linger.is_some()) {
            (Some(s), false) => {
                debug_assert_eq!(self.session_timer, timer_of(s), "a stale session timer");
                self.session_timer
            }
            _ => None,
        };
        [quic, linger, fence, session].into_iter().flatten().min()
    }

    /// Handles what is due at `now` (its delivery bound checked first, by the caller).
    fn on_timer(&mut self, now: Instant) {
        if self.q.poll_timeout().is_some_and(|t| t <= now) {
            self.q.handle_timeout(now);
        }
        if !self.ended && self.events.fence.as_ref().is_some_and(|f| f.until <= now) {
            tracing::debug!(
                user = self.events.user,
                "closing a connection whose client did not acknowledge what preceded a revocation"
            );
            self.metrics.fence_closed();
            self.close(now, CLOSE_SLOW, "delivery not acknowledged in time");
            return;
        }
        if let Some(l) = self.linger.take() {
            if l.until <= now {
                self.close(now, l.code, &l.reason);
            } else {
                self.linger = Some(l);
            }
            return;
        }
        if self.ended {
            return;
        }
        if self.session_timer.is_none_or(|t| t > now) {
            return;
        }
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let fired = s.on_timer();
        self.session_timer = timer_of(s);
        if let Err(end) = fired {
            let (code, reason) = end.close().unwrap_or((CLOSE_DONE, ""));
            self.close(now, code, reason);
        }
    }

    /// Closes the connection with `code` and `reason`; the session ends.
    fn close(&mut self, now: Instant, code: u32, reason: &str) {
        if !self.ended {
            self.q.close(
                now,
                VarInt::from_u32(code),
                Bytes::copy_from_slice(reason.as_bytes()),
            );
        }
        self.linger = None;
        self.end();
    }

    /// The session is over (its connection closed or lost): nothing more will be written, so
    /// every fence is passed.
    fn end(&mut self) {
        self.ended = true;
        self.events.fence = None;
        if let Some(queue) = &self.events.queue {
            queue.fenced(u64::MAX);
        }
        if let Some(s) = self.session.take() {
            tokio::spawn(s.end());
        }
    }
}

impl<B: Backend> Drop for Conn<B> {
    fn drop(&mut self) {
        // A connection dropped unclosed (the driver stopped) writes nothing more either.
        if let Some(queue) = &self.events.queue {
            queue.fenced(u64::MAX);
        }
    }
}

/// Gives back a buffer a burst grew, once it is empty.
fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > 4096 {
        *buf = Vec::new();
    }
}
