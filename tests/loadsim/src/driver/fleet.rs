//! The batched client driver: every participant's connection on one UDP socket, as
//! quinn-proto state machines driven by one task, and every participant's schedule in that same
//! task — the client-side twin of the node's own client-service driver
//! (`nearby_node::service::driver`), sending through its batches.
//!
//! ```text
//!          recvmmsg (GRO)                                          sendmmsg (GSO)
//!  socket ───────────────▶ Endpoint::handle ─▶ Conn ─▶ poll_transmit ─▶ udp::Batch ──▶ socket
//!                                               │ ▲
//!        responses, events ─▶ Phone (the oracle's  │ └─ requests: the setup, then an update at
//!        records, written in place)              │    every due slot of the schedule
//! ```
//!
//! The SDK driver gives each participant an SDK `Client` — a quinn connection with its own
//! driver task, an event channel to a reader task, and a task for the schedule — and at the
//! comparison's loads costs about as much CPU per delivered push as the node it measures. Here
//! a wake-up reads every datagram waiting, fires every slot and timer that is due, and sends what
//! every connection has in as few `sendmmsg` calls as the kernel takes; no task, channel or
//! buffer per connection but quinn-proto's own.
//!
//! What a participant does is the SDK driver's, request for request: a token (`DevLogin`),
//! `Hello` (following a redirect to the user's node), the privacy settings, the first location,
//! the strangers' page for a listener, then one update per slot, each awaited (a slot due while
//! the answer is awaited is skipped and counted late). What it leaves out is what a comparison
//! never needs: reconnecting. A connection lost ends its participant's run (an error, and an
//! outage from then on, so the oracle judges nothing after it), and churn needs the SDK driver.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nearby_client::proto::{
    frame, Event as PushEvent, FrameBuffer, GhostMode, Request, RequestFrame, Response, ResponseFrame,
    PROTOCOL_VERSION,
};
use nearby_index::geo::UserId;
use nearby_node::service::driver::udp;
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Event, StreamEvent, StreamId, VarInt,
};
use tokio::sync::{mpsc, watch};

use super::{
    first_slot, heard_event, lock, next_slot, page_entries, DriverError, ParticipantOut, Settings, Shared,
    StrangerSeen, FIRST_TIMED_AFTER,
};
use crate::oracle::{Micros, Outcome};
use crate::world::Mover;

/// `recvmmsg` calls per wake-up before the fleet sends what it has.
const RECV_ROUNDS: usize = 8;
/// GSO segments per transmit at most (quinn's own cap).
const MAX_SEGMENTS: usize = 10;
/// Redirects a participant follows before it gives up (the SDK's limit).
const MAX_REDIRECTS: u8 = 3;
/// How long closing connections may take to drain when the run ends.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// One participant as the fleet starts it.
pub(super) struct Member {
    pub(super) mover: Mover,
    pub(super) settings: Settings,
}

/// What a participant asked, awaiting its answer.
#[derive(Clone, Copy, Debug)]
enum Ask {
    Login,
    Hello,
    /// Hidden from everyone: ghost mode (`true`) or sharing off.
    HideAll {
        ghost: bool,
    },
    HideFrom(UserId),
    Discoverable,
    /// The first location, index `j` of the participant's sent updates.
    First {
        j: usize,
    },
    Strangers,
    /// A scheduled update, index `j`.
    Update {
        j: usize,
    },
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
struct Asked {
    id: u64,
    ask: Ask,
    /// When it counts as unanswered.
    until: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not connected yet (waiting for a place among those connecting).
    Waiting,
    /// Connecting and making its setup requests.
    Setup,
    /// Set up, waiting for the steps.
    Ready,
    /// Sending on its schedule.
    Running,
    /// Its schedule is over, or its run ended early.
    Done,
}

/// One participant: its user, its movement, where its setup is, its schedule and its records.
struct Phone {
    user: UserId,
    mover: Mover,
    /// The requests of the setup still to make, in order.
    todo: VecDeque<Ask>,
    token: Option<String>,
    asked: Option<Asked>,
    next_id: u64,
    phase: Phase,
    /// Its current connection's slot.
    conn: Option<usize>,
    /// Where it connects.
    to: SocketAddr,
    redirects: u8,
    connected_at: Micros,
    /// No scheduled update before this (the node's minimum interval after the first).
    first_timed: Instant,
    /// The step its schedule is in, and its next slot.
    step: usize,
    slot: Option<Instant>,
    /// The slot the update in flight was sent for.
    sent_slot: Instant,
    /// Its earliest deadline in the fleet's heap (entries that moved are skipped).
    scheduled: Option<Instant>,
    out: ParticipantOut,
}

/// One connection: quinn-proto's state, the control stream's bytes both ways, and the event
/// stream's.
struct Conn {
    q: quinn_proto::Connection,
    /// The participant it belongs to.
    owner: u32,
    /// Closed (a redirect, or the run's end): draining, no longer its participant's.
    retired: bool,
    control: Option<StreamId>,
    out: Vec<u8>,
    responses: FrameBuffer,
    events: Option<StreamId>,
    pushed: FrameBuffer,
    scheduled: Option<Instant>,
    dirty: bool,
}

/// The steps' times, once the run's start is known.
struct Plan {
    /// Per step: start, end, the interval between one participant's slots.
    steps: Vec<(Instant, Instant, Duration)>,
    /// When the drain after the last step ends.
    end: Instant,
}

/// Every participant's connection and schedule, on one socket (see the module doc).
pub(super) struct Fleet {
    shared: Arc<Shared>,
    socket: Arc<tokio::net::UdpSocket>,
    state: quinn_udp::UdpSocketState,
    endpoint: quinn_proto::Endpoint,
    client: ClientConfig,
    phones: Vec<Phone>,
    /// Connections by quinn-proto handle (a dense index).
    conns: Vec<Option<Conn>>,
    /// Connection deadlines, by slot.
    conn_timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Participant deadlines (slots, answers due), by participant.
    phone_timers: BinaryHeap<Reverse<(Instant, u32)>>,
    dirty: Vec<usize>,
    /// Participants not connected yet, in order, and how many are in their setup.
    waiting: VecDeque<u32>,
    in_setup: usize,
    plan: Option<Plan>,
    /// Set when the run is over: connections close, and may drain until then.
    closing: Option<Instant>,
    batch: udp::Batch,
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    segments: usize,
    ready: mpsc::Sender<bool>,
}

impl Fleet {
    /// Binds the fleet's socket and readies one phone per member; `ready` hears each one's
    /// setup (`true`: ready for the steps).
    pub(super) fn new(
        shared: Arc<Shared>,
        members: Vec<Member>,
        ready: mpsc::Sender<bool>,
    ) -> Result<Fleet, DriverError> {
        let c = &shared.config;
        let setup = |what: &str, e: &dyn std::fmt::Display| DriverError::Setup(format!("{what}: {e}"));
        let mut targets = Vec::with_capacity(c.endpoints.len());
        for e in &c.endpoints {
            let addr = resolve(e).map_err(|why| setup(e, &why))?;
            targets.push(addr);
        }
        if targets.is_empty() {
            return Err(DriverError::Setup("no endpoint to connect to".into()));
        }
        let client = nearby_client::tls::client_config_with(&c.ca_pem, c.keep_alive, c.idle_timeout)
            .map_err(|e| setup("client configuration", &e))?;
        let bind: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        let socket = std::net::UdpSocket::bind(bind).map_err(|e| setup("udp socket", &e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| setup("udp socket", &e))?;
        let state = quinn_udp::UdpSocketState::new((&socket).into()).map_err(|e| setup("udp socket", &e))?;
        let socket = Arc::new(tokio::net::UdpSocket::from_std(socket).map_err(|e| setup("udp socket", &e))?);
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            !state.may_fragment(),
            None,
        );
        let segments = state.max_gso_segments().clamp(1, MAX_SEGMENTS);
        let now = Instant::now();
        let phones = members
            .into_iter()
            .enumerate()
            .map(|(p, m)| {
                let user = shared.ids[p];
                let mut todo = VecDeque::from([Ask::Login, Ask::Hello]);
                let s = m.settings;
                if s.sharing_off {
                    todo.push_back(Ask::HideAll { ghost: s.ghost });
                }
                todo.extend(s.hide_from.map(Ask::HideFrom));
                if s.discoverable {
                    todo.push_back(Ask::Discoverable);
                }
                todo.push_back(Ask::First { j: 0 });
                if s.listen {
                    todo.push_back(Ask::Strangers);
                }
                Phone {
                    user,
                    mover: m.mover,
                    todo,
                    token: None,
                    asked: None,
                    next_id: 1,
                    phase: Phase::Waiting,
                    conn: None,
                    // Spread logins over the nodes, as the SDK driver does.
                    to: targets[(user as usize) % targets.len()],
                    redirects: 0,
                    connected_at: 0,
                    first_timed: now,
                    step: 0,
                    slot: None,
                    sent_slot: now,
                    scheduled: None,
                    out: ParticipantOut::default(),
                }
            })
            .collect::<Vec<_>>();
        let waiting = (0..phones.len() as u32).collect();
        Ok(Fleet {
            shared,
            socket,
            state,
            endpoint,
            client,
            phones,
            conns: Vec::new(),
            conn_timers: BinaryHeap::new(),
            phone_timers: BinaryHeap::new(),
            dirty: Vec::new(),
            waiting,
            in_setup: 0,
            plan: None,
            closing: None,
            batch: udp::Batch::default(),
            scratch: Vec::new(),
            recv_buf: vec![0; udp::RECV_SLOT * quinn_udp::BATCH_SIZE],
            segments,
            ready,
        })
    }

    /// Runs every participant to the end of the drain; their records, in participant order.
    pub(super) async fn run(
        mut self,
        mut go: watch::Receiver<Option<tokio::time::Instant>>,
    ) -> Vec<ParticipantOut> {
        let socket = Arc::clone(&self.socket);
        let mut started = false;
        let mut now = Instant::now();
        loop {
            // Sessions that got ready let others connect; then whatever the turn produced goes.
            self.admit(now);
            if let Err(e) = self.flush(now).await {
                tracing::error!(error = %e, "the fleet cannot send");
                break;
            }
            if self
                .closing
                .is_some_and(|until| now >= until || self.conns.iter().all(Option::is_none))
            {
                break;
            }
            let next = self.next_deadline();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                readable = socket.readable() => {
                    if let Err(e) = readable {
                        tracing::error!(error = %e, "the fleet's socket failed");
                        break;
                    }
                }
                changed = go.changed(), if !started => {
                    let start = match changed {
                        Ok(()) => *go.borrow_and_update(),
                        Err(_) => Some(tokio::time::Instant::now()),
                    };
                    if let Some(start) = start {
                        started = true;
                        self.begin(start.into_std());
                    }
                }
                () = sleep => {}
            }
            now = Instant::now();
            self.receive(now);
            self.expire(now);
        }
        self.phones.into_iter().map(|ph| ph.out).collect()
    }

    /// Starts connections while fewer than the configured number are in their setup.
    fn admit(&mut self, now: Instant) {
        while self.in_setup < self.shared.config.connect_concurrency.max(1) && self.closing.is_none() {
            let Some(p) = self.waiting.pop_front() else { break };
            self.in_setup += 1;
            let phone = &mut self.phones[p as usize];
            phone.phase = Phase::Setup;
            phone.connected_at = self.shared.now();
            self.connect(p, now);
        }
    }

    /// Opens a connection for participant `p` to its current address.
    fn connect(&mut self, p: u32, now: Instant) {
        let to = self.phones[p as usize].to;
        let name = self.shared.config.server_name.clone();
        match self.endpoint.connect(now, self.client.clone(), to, &name) {
            Ok((handle, q)) => {
                let slot = handle.0;
                if self.conns.len() <= slot {
                    self.conns.resize_with(slot + 1, || None);
                }
                self.conns[slot] = Some(Conn {
                    q,
                    owner: p,
                    retired: false,
                    control: None,
                    out: Vec::new(),
                    responses: FrameBuffer::new(),
                    events: None,
                    pushed: FrameBuffer::new(),
                    scheduled: None,
                    dirty: false,
                });
                self.phones[p as usize].conn = Some(slot);
                let until = now + self.shared.config.connect_timeout;
                self.phones[p as usize].asked = Some(Asked {
                    id: 0,
                    ask: Ask::Login,
                    until,
                });
                self.wake_phone(p);
                self.touch(slot);
            }
            Err(e) => self.end_phone(p, now, Some(("connect", &format!("cannot connect to {to}: {e}")))),
        }
    }

    /// The steps start at `start`: every participant set up gets its first slot.
    fn begin(&mut self, start: Instant) {
        let mut steps = Vec::with_capacity(self.shared.config.steps.len());
        let m = self.phones.len() as f64;
        let mut at = start;
        for s in &self.shared.config.steps {
            steps.push((at, at + s.duration, Duration::from_secs_f64(m / s.rate)));
            at += s.duration;
        }
        self.plan = Some(Plan {
            steps,
            end: at + self.shared.config.drain,
        });
        for p in 0..self.phones.len() as u32 {
            if self.phones[p as usize].phase == Phase::Ready {
                self.phones[p as usize].phase = Phase::Running;
                self.schedule_step(p);
            }
        }
    }

    /// Sets participant `p`'s first slot in its current step or a later one (none: it is done).
    fn schedule_step(&mut self, p: u32) {
        let Some(plan) = &self.plan else { return };
        let m = self.phones.len() as f64;
        let phone = &mut self.phones[p as usize];
        phone.slot = None;
        while let Some(&(from, to, interval)) = plan.steps.get(phone.step) {
            let first = first_slot(from, interval, p, m, phone.first_timed);
            if first < to {
                phone.slot = Some(first);
                break;
            }
            phone.step += 1;
        }
        if phone.slot.is_none() {
            phone.phase = Phase::Done;
        }
        self.wake_phone(p);
    }

    /// The update of participant `p` was answered (or given up on) at `now`: its next slot, the
    /// ones missed meanwhile skipped and counted late.
    fn next_slot(&mut self, p: u32, now: Instant) {
        let Some(plan) = &self.plan else { return };
        let phone = &mut self.phones[p as usize];
        let Some(&(_, to, interval)) = plan.steps.get(phone.step) else {
            return;
        };
        let next = next_slot(phone.sent_slot, interval, now, &self.shared.late);
        if next < to {
            phone.slot = Some(next);
            self.wake_phone(p);
        } else {
            phone.step += 1;
            self.schedule_step(p);
        }
    }

    fn touch(&mut self, slot: usize) {
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Puts participant `p`'s earliest deadline in the heap if it is earlier than the one there.
    fn wake_phone(&mut self, p: u32) {
        let phone = &mut self.phones[p as usize];
        let at = [phone.slot, phone.asked.map(|a| a.until)]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = at {
            if phone.scheduled.is_none_or(|s| at < s) {
                phone.scheduled = Some(at);
                self.phone_timers.push(Reverse((at, p)));
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let mut conn = None;
        while let Some(&Reverse((at, slot))) = self.conn_timers.peek() {
            if self
                .conns
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.scheduled == Some(at))
            {
                conn = Some(at);
                break;
            }
            self.conn_timers.pop();
        }
        let mut phone = None;
        while let Some(&Reverse((at, p))) = self.phone_timers.peek() {
            if self.phones[p as usize].scheduled == Some(at) {
                phone = Some(at);
                break;
            }
            self.phone_timers.pop();
        }
        let end = match self.closing {
            Some(until) => Some(until),
            None => self.plan.as_ref().map(|p| p.end),
        };
        [conn, phone, end].into_iter().flatten().min()
    }

    fn receive(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.recv_buf);
        let socket = Arc::clone(&self.socket);
        let mut datagrams = std::mem::take(&mut self.scratch);
        datagrams.clear();
        udp::receive(&socket, &self.state, &mut buf, RECV_ROUNDS, |meta, data| {
            let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
            match self.endpoint.handle(
                now,
                meta.addr,
                meta.dst_ip,
                ecn,
                BytesMut::from(data),
                &mut datagrams,
            ) {
                Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                    if let Some(Some(c)) = self.conns.get_mut(handle.0) {
                        c.q.handle_event(event);
                        if !c.dirty {
                            c.dirty = true;
                            self.dirty.push(handle.0);
                        }
                    }
                }
                Some(DatagramEvent::Response(t)) => self.batch.push_transmit(&t, &datagrams),
                // A client endpoint accepts no connection.
                Some(DatagramEvent::NewConnection(_)) | None => {}
            }
            datagrams.clear();
        });
        self.scratch = datagrams;
        self.recv_buf = buf;
    }

    /// Fires every deadline that has passed: connections' timers, participants' slots and
    /// overdue answers, the run's end.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, slot))) = self.conn_timers.peek() {
            if at > now {
                break;
            }
            self.conn_timers.pop();
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.scheduled != Some(at) {
                continue;
            }
            c.scheduled = None;
            match c.q.poll_timeout() {
                // Fired early (the loss timer, cleared by an acknowledgement since): set again,
                // the connection not driven for nothing.
                Some(next) if next > now => {
                    c.scheduled = Some(next);
                    self.conn_timers.push(Reverse((next, slot)));
                    continue;
                }
                Some(_) => c.q.handle_timeout(now),
                None => {}
            }
            self.touch(slot);
        }
        while let Some(&Reverse((at, p))) = self.phone_timers.peek() {
            if at > now {
                break;
            }
            self.phone_timers.pop();
            if self.phones[p as usize].scheduled != Some(at) {
                continue;
            }
            self.phones[p as usize].scheduled = None;
            self.phone_timer(p, now);
        }
        if self.closing.is_none() && self.plan.as_ref().is_some_and(|plan| now >= plan.end) {
            self.close_all(now);
        }
    }

    fn phone_timer(&mut self, p: u32, now: Instant) {
        let phone = &mut self.phones[p as usize];
        if let Some(asked) = phone.asked.filter(|a| a.until <= now) {
            phone.asked = None;
            match asked.ask {
                // An update's outcome stays unknown; the schedule goes on (the answer, if it
                // comes, is ignored).
                Ask::Update { .. } => {
                    self.shared.error_named("timeout");
                    self.next_slot(p, now);
                }
                _ => {
                    let what = format!("no answer to {:?} within its timeout", asked.ask);
                    self.end_phone(p, now, Some(("timeout", &what)));
                }
            }
        }
        let phone = &mut self.phones[p as usize];
        if phone.slot.is_some_and(|s| s <= now) && phone.asked.is_none() && phone.phase == Phase::Running {
            let slot = phone.slot.take().unwrap_or(now);
            phone.sent_slot = slot;
            let pos = phone.mover.advance(self.shared.period_s);
            let j = self.shared.record_send(p, pos);
            self.shared.live.updates.fetch_add(1, Ordering::Relaxed);
            self.ask(p, now, Request::UpdateLocation { at: pos }, Ask::Update { j });
        }
        self.wake_phone(p);
    }

    /// Writes a request of participant `p` on its connection.
    fn ask(&mut self, p: u32, now: Instant, request: Request, ask: Ask) {
        let phone = &mut self.phones[p as usize];
        let Some(slot) = phone.conn else { return };
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let id = phone.next_id;
        phone.next_id += 1;
        if let Err(e) = frame::encode(&RequestFrame { id, request }, &mut c.out) {
            tracing::error!(error = %e, "a request does not encode");
            return;
        }
        let wait = match ask {
            Ask::Update { .. } => self.shared.config.call_timeout,
            _ => self.shared.config.request_timeout,
        };
        phone.asked = Some(Asked {
            id,
            ask,
            until: now + wait,
        });
        self.wake_phone(p);
        self.touch(slot);
    }

    /// Makes participant `p`'s next setup request, or marks it ready when there is none.
    fn next_setup(&mut self, p: u32, now: Instant) {
        let phone = &mut self.phones[p as usize];
        let Some(ask) = phone.todo.pop_front() else {
            phone.phase = Phase::Ready;
            phone.first_timed = now + FIRST_TIMED_AFTER;
            self.in_setup -= 1;
            let _ = self.ready.try_send(true);
            if self.plan.is_some() {
                self.phones[p as usize].phase = Phase::Running;
                self.schedule_step(p);
            }
            return;
        };
        let user = phone.user;
        let request = match ask {
            Ask::Login => Request::DevLogin { user },
            Ask::Hello => Request::Hello {
                version: PROTOCOL_VERSION,
                user,
                token: phone.token.clone().unwrap_or_default(),
                client: concat!("nearby-loadsim-fleet/", env!("CARGO_PKG_VERSION")).to_string(),
            },
            Ask::HideAll { ghost: true } => Request::SetGhost { mode: GhostMode::On },
            Ask::HideAll { ghost: false } => Request::SetSharing { on: false },
            Ask::HideFrom(friend) => Request::Hide { user: friend },
            Ask::Discoverable => Request::SetDiscoverable { on: true },
            Ask::First { .. } => {
                let pos = phone.mover.position();
                let j = self.shared.record_send(p, pos);
                self.shared.live.updates.fetch_add(1, Ordering::Relaxed);
                return self.ask(p, now, Request::UpdateLocation { at: pos }, Ask::First { j });
            }
            Ask::Strangers => Request::ListStrangers { page_size: None },
            Ask::Update { .. } => return,
        };
        self.ask(p, now, request, ask);
    }

    /// An answer for participant `p`.
    fn answered(&mut self, p: u32, now: Instant, frame: ResponseFrame) {
        let phone = &mut self.phones[p as usize];
        let Some(asked) = phone.asked.filter(|a| a.id == frame.id) else {
            // The answer to a request given up on.
            return;
        };
        phone.asked = None;
        let at = self.shared.now();
        let out = &mut phone.out;
        match (asked.ask, frame.response) {
            (Ask::Login | Ask::Hello, Response::Redirect(r)) => return self.redirect(p, now, &r.addr),
            (Ask::Login, Response::Token { token, .. }) => phone.token = Some(token),
            (Ask::Hello, Response::Welcome(info)) => {
                self.shared.live.sessions.fetch_add(1, Ordering::Relaxed);
                lock(&self.shared.session).get_or_insert((f64::from(info.radius_m), info.ttl_s));
            }
            (Ask::HideAll { .. }, Response::Done(_) | Response::Ghost { .. }) => out.sharing_off = true,
            (Ask::HideFrom(friend), Response::Done(_)) => out.hid_from = Some(friend),
            (Ask::Discoverable, Response::Done(_)) => out.discoverable = true,
            (Ask::First { j }, Response::Started { page, .. }) => {
                self.shared.record_outcome(p, j, Outcome::Acked(at));
                out.startup = Some((at.saturating_sub(phone.connected_at), true));
                page_entries(&page, at, &mut out.received);
            }
            (Ask::First { j }, Response::Located { .. }) => {
                self.shared.record_outcome(p, j, Outcome::Acked(at));
                out.startup = Some((at.saturating_sub(phone.connected_at), false));
            }
            (Ask::Strangers, Response::Strangers(page)) => {
                out.strangers
                    .extend(page.strangers.iter().map(|s| StrangerSeen::of(s, at)));
            }
            (Ask::Update { j }, Response::Located { .. } | Response::Started { .. }) => {
                self.shared.record_outcome(p, j, Outcome::Acked(at));
                return self.next_slot(p, now);
            }
            (ask, Response::Error(body)) => {
                self.shared.error_text(body.code.name(), &body);
                match ask {
                    Ask::Update { j } => {
                        self.shared.record_outcome(p, j, Outcome::Refused(at));
                        return self.next_slot(p, now);
                    }
                    Ask::First { j } => self.shared.record_outcome(p, j, Outcome::Refused(at)),
                    Ask::Login | Ask::Hello => return self.end_phone(p, now, None),
                    _ => {}
                }
            }
            (ask, other) => {
                self.shared
                    .error_text("protocol", &format!("unexpected answer to {ask:?}: {other:?}"));
                if let Ask::Update { .. } = ask {
                    return self.next_slot(p, now);
                }
            }
        }
        if self.phones[p as usize].phase == Phase::Setup {
            self.next_setup(p, now);
        }
    }

    /// Participant `p` was sent to `addr`: its connection closes, a new one opens there.
    fn redirect(&mut self, p: u32, now: Instant, addr: &str) {
        let phone = &mut self.phones[p as usize];
        phone.redirects += 1;
        if phone.redirects > MAX_REDIRECTS {
            return self.end_phone(p, now, Some(("too_many_redirects", "too many redirects")));
        }
        let to = match resolve(addr) {
            Ok(to) => to,
            Err(why) => {
                let why = format!("redirected to {addr}: {why}");
                return self.end_phone(p, now, Some(("resolve", &why)));
            }
        };
        phone.to = to;
        phone.todo.push_front(Ask::Hello);
        if phone.token.is_none() {
            phone.todo.push_front(Ask::Login);
        }
        self.retire(p, now, "redirected");
        self.connect(p, now);
    }

    /// Closes participant `p`'s connection (it drains on its own) and detaches it.
    fn retire(&mut self, p: u32, now: Instant, reason: &str) {
        if let Some(slot) = self.phones[p as usize].conn.take() {
            if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                c.retired = true;
                c.q.close(
                    now,
                    VarInt::from_u32(0),
                    Bytes::copy_from_slice(reason.as_bytes()),
                );
            }
            self.touch(slot);
        }
    }

    /// Participant `p`'s run ends early: its connection (if any) closes, and it has an outage
    /// from about now to the end; `error` (a code and a message) is recorded unless the error
    /// that ended it already was.
    fn end_phone(&mut self, p: u32, now: Instant, error: Option<(&str, &str)>) {
        let phone = &mut self.phones[p as usize];
        if phone.phase != Phase::Done || self.closing.is_none() {
            if let Some((code, why)) = error {
                tracing::debug!(user = phone.user, why, "participant ended");
                self.shared.error_text(code, &why);
            }
            if phone.phase == Phase::Setup {
                self.in_setup -= 1;
                let _ = self.ready.try_send(false);
            }
            // As the SDK driver counts a lost connection: lost a little before it was noticed.
            let at = self.shared.now();
            phone
                .out
                .outages
                .push((at.saturating_sub(1_000_000), Micros::MAX));
            phone.phase = Phase::Done;
            phone.asked = None;
            phone.slot = None;
        }
        self.retire(p, now, "bye");
    }

    /// The run is over: every connection closes.
    fn close_all(&mut self, now: Instant) {
        self.closing = Some(now + CLOSE_WAIT);
        let at = self.shared.now();
        for p in 0..self.phones.len() as u32 {
            let phone = &mut self.phones[p as usize];
            if phone.conn.is_some() {
                phone.out.outages.push((at, Micros::MAX));
                phone.phase = Phase::Done;
                phone.asked = None;
                phone.slot = None;
                self.retire(p, now, "bye");
            }
        }
    }

    /// Drives every touched connection and sends what they have.
    async fn flush(&mut self, now: Instant) -> std::io::Result<()> {
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for slot in dirty {
                self.drive(slot, now);
                let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                self.batch
                    .take_transmits(
                        &mut c.q,
                        now,
                        self.segments,
                        &mut self.scratch,
                        &self.socket,
                        |_| {},
                    )
                    .await?;
                let (drained, again) =
                    udp::endpoint_events(&mut self.endpoint, ConnectionHandle(slot), &mut c.q);
                c.dirty |= again;
                if drained {
                    self.conns[slot] = None;
                    continue;
                }
                if c.dirty {
                    self.dirty.push(slot);
                }
                if let Some(at) = c.q.poll_timeout() {
                    if c.scheduled.is_none_or(|s| at < s) {
                        c.scheduled = Some(at);
                        self.conn_timers.push(Reverse((at, slot)));
                    }
                }
            }
        }
        if !self.batch.is_empty() {
            udp::send_all(&self.socket, &mut self.batch, |_| {}).await?;
        }
        Ok(())
    }

    /// Handles one connection's events, then its streams: answers to its participant, pushes
    /// recorded, requests written.
    fn drive(&mut self, slot: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.dirty = false;
        let (owner, retired) = (c.owner, c.retired);
        let mut connected = false;
        let mut lost = None;
        // Streams are read when quinn-proto says they have something: most packets carry events
        // only, and a read of a stream with nothing new still costs a lookup and a copy.
        let (mut answers, mut events) = (false, false);
        while let Some(event) = c.q.poll() {
            match event {
                Event::Connected => connected = true,
                Event::ConnectionLost { reason } => lost = Some(reason),
                Event::Stream(StreamEvent::Readable { id }) => {
                    answers |= Some(id) == c.control;
                    events |= Some(id) == c.events;
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => events = true,
                _ => {}
            }
        }
        if retired {
            return;
        }
        if connected {
            c.control = c.q.streams().open(Dir::Bi);
        }
        while let Some(id) = c.q.streams().accept(Dir::Uni) {
            c.events = Some(id);
        }
        if let (Some(id), true) = (c.control, answers) {
            read(&mut c.q, id, &mut c.responses);
        }
        if let (Some(id), true) = (c.events, events) {
            read(&mut c.q, id, &mut c.pushed);
        }
        let at = self.shared.now();
        let mut broken = None;
        let out = &mut self.phones[owner as usize].out;
        loop {
            match c.pushed.next_frame::<PushEvent>() {
                Ok(Some(e)) => heard_event(&self.shared, e, at, &mut out.received, &mut out.strangers),
                Ok(None) => break,
                Err(e) => {
                    broken = Some(format!("a bad event frame: {e}"));
                    break;
                }
            }
        }
        if connected {
            // The handshake is done: the setup's first request (the connect's deadline goes).
            self.phones[owner as usize].asked = None;
            self.next_setup(owner, now);
        }
        while let Some(c) = self
            .conns
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|c| !c.retired)
        {
            match c.responses.next_frame::<ResponseFrame>() {
                Ok(Some(answer)) => self.answered(owner, now, answer),
                Ok(None) => break,
                Err(e) => {
                    broken = Some(format!("a bad response frame: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = broken {
            return self.end_phone(owner, now, Some(("protocol", &why)));
        }
        if let Some(reason) = lost {
            if self.phones[owner as usize].conn == Some(slot) {
                self.phones[owner as usize].conn = None;
                let why = format!("connection lost: {reason}");
                self.end_phone(owner, now, Some(("connection_lost", &why)));
            }
            return;
        }
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if let (Some(id), false) = (c.control, c.out.is_empty()) {
            match c.q.send_stream(id).write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(quinn_proto::WriteError::Blocked) => {}
                Err(e) => {
                    let why = format!("cannot write a request: {e}");
                    self.end_phone(owner, now, Some(("connection_lost", &why)));
                }
            }
        }
    }
}

/// Moves what stream `id` has into `into`.
fn read(q: &mut quinn_proto::Connection, id: StreamId, into: &mut FrameBuffer) {
    let mut stream = q.recv_stream(id);
    let Ok(mut chunks) = stream.read(true) else { return };
    // The end of the stream, a reset or nothing more for now: what was read stays.
    while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
        into.extend(&chunk.bytes);
    }
    let _ = chunks.finalize();
}

/// `host:port` as a socket address.
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_string())
}
