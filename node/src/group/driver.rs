//! The driver of one led shard group: the only task that touches the group's live state.
//!
//! A driver runs on the node that leads its group, from the moment the node has become leader
//! and applied everything committed before (see `cluster`), until it loses leadership. It owns
//! the group's [`Presence`] and reacts, in one loop, to:
//!
//! - **applied entries** of the group, in log order, on whichever node leads — so a relation or
//!   privacy change takes effect on live streams from the apply path, whoever proposed it;
//! - **its mailbox** ([`GroupMsg`]): sessions' locations and page requests, messages from other
//!   groups' drivers (here or on peers), deadline ticks;
//! - **new cluster maps**: new ranges, and other groups' new leaders, whose subscribers it
//!   subscribes again.
//!
//! # Barriers: what "acknowledged" waits for
//!
//! A change applied at index `i` that ends someone's permission to see a user makes the
//! presence send revocations that ask for an acknowledgement under `Barrier { group, index: i }`.
//! The driver counts them; [`GroupMsg::AwaitBarrier`] answers once every one is acknowledged —
//! each viewer's group has forgotten the user and purged its sessions' queues, and the viewers'
//! clients have acknowledged what their connections carried before the purge (a delivery fence,
//! see [`crate::queue`]: a client that does not acknowledge within two seconds loses its
//! connection instead). A viewer group's
//! driver sends its acknowledgements only once its leadership is confirmed by a quorum round (a
//! leader deposed without knowing it must not confirm what its successor may not have seen).
//! A driver that has just started holds its acknowledgements of revocations for [`VIEWER_HOLD`]:
//! the sessions of the group's previous leader may still deliver what it let out, until a bound
//! after its lease ended ([`crate::queue::DELIVERY_BOUND`]).
//! A revocation not acknowledged within [`RESEND_AFTER`] is sent again (to where its viewers are
//! now, cut by group): a message
//! lost on its way costs a second, not the bound. The wait is bounded by [`ACK_WAIT`]: a viewer
//! group that cannot be reached in that time makes the wait
//! fail (the change stays committed; the client is told it is not yet confirmed). A driver that
//! has just started (a failover) also holds barriers until [`RESUBSCRIBE_GRACE`] has passed:
//! viewer groups that still knew the user through the previous leader subscribe again within it,
//! and their snapshots carry the change.
//!
//! # Call order
//!
//! 1. [`spawn`] MUST be called only once the node leads the group and has applied every entry
//!    committed before (the supervisor confirms with a linearizable read); it subscribes to the
//!    group's applied entries before it reads anything.
//! 2. Messages are sent through the returned [`DriverHandle`].
//! 3. [`DriverTask::stop`] when leadership is lost; the driver drops its live state (a new
//!    leader rebuilds it from clients and peers).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{ErrorCode, Relation};
use nearby_index::friends::RangeTable;
use nearby_index::geo::{Millis, UserId};
use nearby_raft::{AppliedEntry, Command, GroupId, NodeId, Payload, Reply, ShardGroup};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::api::{wire_page, LocationAck, ServiceConfig, ServiceError};
use crate::clock::{sleep_until, Clock};
use crate::group::lease::{Answer, Item, Lease};
use crate::group::{DriverHandle, GroupMsg};
use crate::presence::{GroupMessage, Output, Presence};
use crate::queue::{DeliveryLease, Fences, Subject};
use crate::route::directory::MapView;
use crate::route::router::Router;
use crate::sessions::Sessions;
use crate::strangers::{CellMessage, RELAY_INDEX};

/// The longest a visibility-ending change waits for the viewers' groups to acknowledge.
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// How long a new leader holds visibility-ending acknowledgements, so that viewer groups that
/// knew the user through the previous leader have subscribed again.
///
/// Not ended early when every group has confirmed the run: a group confirms once it has *sent*
/// its subscriptions again, not once it has applied the snapshots they bring back — a change
/// decided before this run started reaches such a group only with its snapshot. Tried, and a
/// fault run showed a friend's page entry 0.5 s after the acknowledgement (2026-12-02).
/// Ending it on confirmations needs confirmations sent after the snapshots were applied.
pub const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(3);

/// How long a new driver holds its acknowledgements of revocations to other groups: longer than
/// the sessions of the group's previous leader may still deliver what that leader let out
/// ([`crate::queue::DELIVERY_BOUND`] after its lease ended, which was before this driver
/// started), with a margin for timers and scheduling. A viewer group's failover otherwise lets
/// an author be told of a hide while a position about them is still on its way from the
/// deposed leader.
pub const VIEWER_HOLD: Duration = Duration::from_millis(2_500);

const _: () = assert!(VIEWER_HOLD.as_millis() > crate::queue::DELIVERY_BOUND.as_millis());

/// Deliveries remembered per source group, to answer which entry carried an intent.
const RECENT_DELIVERIES: usize = 1_024;

/// The longest a session's first page waits for its publishers' snapshots.
pub const FIRST_PAGE_WAIT: Duration = Duration::from_millis(500);

type Waiter = oneshot::Sender<Result<(), ServiceError>>;

struct BarrierState {
    /// Revocations (their parts) not acknowledged yet.
    pending: std::collections::HashSet<u32>,
    /// The revocations that ask for acknowledgements, by part: sent again while unacknowledged
    /// (a message lost on its way — a leader that moved, a node that refused it — would
    /// otherwise hold the change until `deadline`; handling one twice changes nothing).
    sent: Vec<(u32, GroupId, GroupMessage)>,
    /// When the unacknowledged parts are sent again.
    resend_at: Instant,
    not_before: Instant,
    deadline: Instant,
    waiters: Vec<Waiter>,
    /// The user whose visibility-ending change the entry is, if it is one: the user's later
    /// barriers settle only after this one (see [`settle_in_order`]).
    actor: Option<UserId>,
    /// An earlier barrier of the same actor failed: this one fails too.
    earlier_failed: bool,
    /// The change ends the actor's visibility to strangers: it settles only once every group
    /// has confirmed this run of the group's live state — until then a channel may still hold
    /// where an earlier run published the actor, which this run cannot retract (see
    /// [`crate::incarnation`]).
    strangers: bool,
}

impl BarrierState {
    /// The unacknowledged parts, addressed to where their viewers are now (a range may have
    /// split or merged since): a part whose viewers are now in several groups is replaced by
    /// one new part per group, since a group acknowledges only viewers it serves.
    fn resend(&mut self, ranges: &RangeTable<GroupId>, out: &mut Vec<(GroupId, GroupMessage)>) {
        let unacked: Vec<(u32, GroupId, GroupMessage)> = self
            .sent
            .iter()
            .filter(|(part, _, _)| self.pending.contains(part))
            .cloned()
            .collect();
        let mut next = self.sent.iter().map(|(part, _, _)| *part + 1).max().unwrap_or(0);
        for (part, to, msg) in unacked {
            let GroupMessage::Revoke {
                from,
                reason,
                viewers,
                at,
                ack: Some(barrier),
            } = msg
            else {
                out.push((to, msg));
                continue;
            };
            let mut by_group: BTreeMap<GroupId, Vec<UserId>> = BTreeMap::new();
            for v in viewers {
                by_group
                    .entry(ranges.locate(v).copied().unwrap_or(to))
                    .or_default()
                    .push(v);
            }
            let single = by_group.len() == 1;
            if !single {
                self.pending.remove(&part);
            }
            for (group, viewers) in by_group {
                let part = if single { part } else { next };
                let msg = GroupMessage::Revoke {
                    from,
                    reason,
                    viewers,
                    at,
                    ack: Some(crate::presence::Barrier { part, ..barrier }),
                };
                if !single {
                    next += 1;
                    self.pending.insert(part);
                    self.sent.push((part, group, msg.clone()));
                }
                out.push((group, msg));
            }
        }
    }
}

/// How long a revocation waits for its acknowledgement before it is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(1);

/// A request that waits for the user's subscriptions to be answered (a first page).
struct Starting {
    user: UserId,
    deadline: Instant,
    reply: StartingReply,
}

enum StartingReply {
    /// The session's first location: answered with the first page.
    Location(oneshot::Sender<Result<LocationAck, ServiceError>>),
    /// Strangers asked while the channels' first answers are awaited.
    Strangers {
        size: usize,
        reply: oneshot::Sender<Result<nearby_client::proto::StrangerPage, ServiceError>>,
    },
    /// A page asked right after connecting.
    List {
        cursor: Option<nearby_index::query::Cursor>,
        size: usize,
        reply: oneshot::Sender<Result<nearby_client::proto::NearbyPage, ServiceError>>,
    },
}

/// What a driver needs from its node.
#[derive(Clone)]
pub struct DriverContext {
    /// Where events go.
    pub sessions: Arc<Sessions>,
    /// Where group messages and proposals go.
    pub router: Arc<Router>,
    /// The node's clock.
    pub clock: Arc<dyn Clock>,
    /// Client-facing settings.
    pub config: ServiceConfig,
    /// Where accepted locations are recorded.
    pub history: Arc<crate::history::History>,
}

/// A running driver: its handle, and how to stop it.
pub struct DriverTask {
    /// How to reach it.
    pub handle: DriverHandle,
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<()>,
}

impl DriverTask {
    /// Stops the driver and waits for it to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.await;
    }
}

/// Starts the driver of `group`, led here in `term` (see the call order in the module doc).
pub fn spawn(group: ShardGroup, ctx: DriverContext, term: u64) -> DriverTask {
    // Subscribe first: nothing applied from here on is missed; what was applied before is in
    // the state the driver reads next.
    let applied = group.subscribe();
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let depth = Arc::new(AtomicUsize::new(0));
    let next_deadline = Arc::new(AtomicU64::new(u64::MAX));
    let last_write = Arc::new(AtomicU64::new(crate::group::now_ms()));
    let handle = DriverHandle {
        group: group.clone(),
        tx,
        depth: Arc::clone(&depth),
        next_deadline: Arc::clone(&next_deadline),
        last_write: Arc::clone(&last_write),
        activity: Arc::default(),
    };
    let activity = Arc::clone(&handle.activity);
    let directory = Arc::clone(ctx.router.directory());
    let map = directory.watch();
    let view = map.borrow().clone();
    let id = group.id();
    let incarnation = crate::incarnation::Incarnation::starting(term);
    let mut presence = Presence::new(
        id,
        incarnation,
        ctx.config.presence.clone(),
        Arc::clone(&view.ranges),
    );
    let processed = group.last_applied().map_or(0, |l| l.index);
    presence.set_applied(processed);
    group.read(|s| presence.load(s, ctx.clock.now()));
    let outbox = Arc::new(Notify::new());
    // Alone in its cluster, a group has no viewers elsewhere that knew it through an earlier
    // leader: nothing to wait for.
    let grace = if view.map.nodes.len() > 1 {
        RESUBSCRIBE_GRACE
    } else {
        Duration::ZERO
    };
    let started = Instant::now();
    let delivery = Arc::new(DeliveryLease::default());
    let driver = Driver {
        id,
        last_write,
        group: group.clone(),
        presence,
        ctx: ctx.clone(),
        rx,
        depth,
        next_deadline,
        applied,
        map,
        leaders: leaders_of(&view),
        processed,
        started,
        grace,
        barriers: BTreeMap::new(),
        early: BTreeMap::new(),
        delivered: HashMap::new(),
        awaiting_delivery: HashMap::new(),
        starting: Vec::new(),
        outbox: Arc::clone(&outbox),
        activity,
        lease: Lease::new(group.clone(), Arc::clone(&delivery)),
        introduce_again: None,
        outlet: Outlet {
            lease: delivery,
            fences: Fences::default(),
            hold_acks_until: started
                + if grace.is_zero() {
                    Duration::ZERO
                } else {
                    VIEWER_HOLD
                },
        },
    };
    let outbox_task = tokio::spawn(crate::group::outbox::run(group, Arc::clone(&ctx.router), outbox));
    let join = tokio::spawn(async move {
        driver.run(stop_rx).await;
        outbox_task.abort();
    });
    DriverTask {
        handle,
        stop: stop_tx,
        join,
    }
}

/// Where each group is, as the map says: its leader, term and range (including the groups
/// this node leads: a group whose leadership moves here or away has a new leader too, and one
/// that split owns another range).
type Placement = (Option<NodeId>, u64, Option<nearby_index::friends::UserRange>);

fn leaders_of(view: &MapView) -> HashMap<GroupId, Placement> {
    view.map
        .groups
        .iter()
        .map(|(id, g)| (*id, (g.leader, g.term, g.range)))
        .collect()
}

struct Driver {
    id: GroupId,
    /// When a write was last applied (see [`DriverHandle::idle_for`]).
    last_write: Arc<AtomicU64>,
    group: ShardGroup,
    presence: Presence,
    ctx: DriverContext,
    rx: mpsc::UnboundedReceiver<GroupMsg>,
    depth: Arc<AtomicUsize>,
    next_deadline: Arc<AtomicU64>,
    applied: mpsc::UnboundedReceiver<AppliedEntry>,
    map: watch::Receiver<Arc<MapView>>,
    leaders: HashMap<GroupId, Placement>,
    /// The last applied index this driver has reacted to.
    processed: u64,
    started: Instant,
    /// How long after `started` barriers are held (see [`RESUBSCRIBE_GRACE`]).
    grace: Duration,
    barriers: BTreeMap<u64, BarrierState>,
    /// Waiters for indexes not processed yet.
    early: BTreeMap<u64, Vec<Waiter>>,
    /// Per source group: recent intents applied here (number → the index they were applied at).
    delivered: HashMap<GroupId, BTreeMap<u64, u64>>,
    awaiting_delivery: HashMap<GroupId, Vec<(u64, Waiter)>>,
    starting: Vec<Starting>,
    outbox: Arc<Notify>,
    activity: Arc<crate::group::Activity>,
    /// What leaves the driver waits for it (see [`crate::group::lease`]).
    lease: Lease,
    /// When this run is next introduced again to groups that have not confirmed it (see
    /// [`crate::incarnation`]); none once all have.
    introduce_again: Option<Instant>,
    /// What leaves for sessions, and what acknowledgements wait for.
    outlet: Outlet,
}

/// What the driver's output to its sessions carries, and what an acknowledgement of a
/// revocation waits for.
struct Outlet {
    /// The lease the sessions' writers see (see [`crate::queue::DeliveryLease`]).
    lease: Arc<DeliveryLease>,
    /// The fences of the revocations let out to sessions here, for the acknowledgements after
    /// them.
    fences: Fences,
    /// Until when acknowledgements wait (see [`VIEWER_HOLD`]).
    hold_acks_until: Instant,
}

/// What an acknowledgement leaving now waits for.
struct AckWait {
    fences: Option<Fences>,
    not_before: Option<Instant>,
}

impl Outlet {
    /// What an acknowledgement leaving now must wait for; `None` if nothing.
    fn ack_wait(&mut self) -> Option<AckWait> {
        let fences = self.fences.take_pending();
        let not_before = (Instant::now() < self.hold_acks_until).then_some(self.hold_acks_until);
        (fences.is_some() || not_before.is_some()).then_some(AckWait { fences, not_before })
    }
}

/// Lets `item` leave the driver: to a session, another group, or a waiting request. A
/// revocation's acknowledgement waits for the fences of the revocations let out before it (and
/// for a new driver's [`VIEWER_HOLD`]).
fn release(ctx: &DriverContext, outlet: &mut Outlet, item: Item) {
    match item {
        Item::Output(Output::Push { viewer, event }) => {
            ctx.sessions
                .push(viewer, event, &outlet.lease, &mut outlet.fences);
        }
        Item::Output(Output::Purge { viewer, about }) => {
            ctx.sessions
                .purge(viewer, Subject::User(about), &mut outlet.fences);
        }
        Item::Output(Output::Send {
            to,
            msg: msg @ GroupMessage::RevokeAck { .. },
        }) => match outlet.ack_wait() {
            None => ctx.router.send(to, msg),
            Some(wait) => send_after(ctx, wait, to, msg),
        },
        Item::Output(Output::Send { to, msg }) => ctx.router.send(to, msg),
        Item::Answer(a) => a.send(),
    }
}

/// Sends `msg` (a revocation's acknowledgement) once `wait` is over: the hold of a new driver
/// has passed and the viewers' clients have acknowledged what was written to them before the
/// revocations.
///
/// Not sent if the fences take longer than [`ACK_WAIT`] (the fences' connections are closed long
/// before): the author's wait fails then, as for a viewer group that cannot be reached.
fn send_after(ctx: &DriverContext, wait: AckWait, to: GroupId, msg: GroupMessage) {
    let router = Arc::clone(&ctx.router);
    tokio::spawn(async move {
        let waited = Instant::now();
        if let Some(t) = wait.not_before {
            tokio::time::sleep_until(t).await;
        }
        let fenced = match wait.fences {
            Some(pending) => tokio::time::timeout(ACK_WAIT, pending.passed()).await.is_ok(),
            None => true,
        };
        if fenced {
            tracing::debug!(to, waited = ?waited.elapsed(), "revocation acknowledged after its fences");
            router.send(to, msg);
        } else {
            tracing::warn!(
                to,
                "viewers' clients did not acknowledge before a revocation in time: not confirmed"
            );
        }
    });
}

impl Driver {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        tracing::info!(
            group = self.id,
            incarnation = %self.presence.incarnation(),
            "driver started"
        );
        // Intents left by earlier leaders are delivered by this one.
        self.outbox.notify_one();
        // Other groups forget what they knew of earlier runs of this group's live state.
        self.presence.introduce();
        self.introduce_again = Some(Instant::now() + crate::incarnation::RESEND_AFTER);
        let outputs = self.presence.poll_outputs();
        self.deliver(outputs);
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                entry = self.applied.recv() => match entry {
                    Some(e) => self.on_applied(e),
                    None => break,
                },
                msg = self.rx.recv() => match msg {
                    Some(m) => {
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        self.on_msg(m);
                    }
                    None => break,
                },
                changed = self.map.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_map();
                }
                leads = self.lease.confirmed() => {
                    let (ctx, outlet) = (&self.ctx, &mut self.outlet);
                    self.lease.concluded(leads, &mut |item| release(ctx, outlet, item));
                }
                () = sleep_until(wake) => {}
            }
            self.on_time();
            self.lease.renew();
            let deadline = self.presence.next_deadline().map_or(u64::MAX, |d| d.0);
            self.next_deadline.store(deadline, Ordering::Relaxed);
        }
        self.group.unsubscribe();
        self.lease.drop_held();
        // Every request still waiting here moves with the leadership, as a request whose driver
        // is gone does (the gateway's answer to a dropped waiter): not answered, the session
        // closed as moved, the SDK sends it again to the new leader. A change already applied
        // comes back as a no-op there, answered after that leader's grace, by which time the
        // viewer groups have subscribed again and learnt it (see `after_grace`).
        let gone = ServiceError::moved;
        for (_, b) in std::mem::take(&mut self.barriers) {
            for w in b.waiters {
                let _ = w.send(Err(gone()));
            }
        }
        for w in std::mem::take(&mut self.early).into_values().flatten() {
            let _ = w.send(Err(gone()));
        }
        for (_, w) in std::mem::take(&mut self.awaiting_delivery)
            .into_values()
            .flatten()
        {
            let _ = w.send(Err(gone()));
        }
        for s in std::mem::take(&mut self.starting) {
            match s.reply {
                StartingReply::Location(r) => drop(r.send(Err(gone()))),
                StartingReply::List { reply, .. } => drop(reply.send(Err(gone()))),
                StartingReply::Strangers { reply, .. } => drop(reply.send(Err(gone()))),
            }
        }
        tracing::info!(group = self.id, "driver stopped");
    }

    fn now(&self) -> Millis {
        self.ctx.clock.now()
    }

    /// The next instant the loop must wake for a barrier, a waiting first page or a lease round.
    fn next_wake(&self) -> Option<Instant> {
        let barrier = self
            .barriers
            .values()
            .map(|b| {
                if b.pending.is_empty() {
                    b.not_before
                } else {
                    b.deadline.min(b.resend_at)
                }
            })
            .min();
        let page = self.starting.iter().map(|s| s.deadline).min();
        barrier
            .into_iter()
            .chain(page)
            .chain(self.lease.next_wake())
            .chain(self.introduce_again)
            .min()
    }

    fn on_applied(&mut self, entry: AppliedEntry) {
        let (log_id, payload, reply) = match entry {
            AppliedEntry::Command {
                log_id,
                payload,
                reply,
            } => (log_id, payload, reply),
            AppliedEntry::Snapshot { last } => {
                self.processed = self.processed.max(last.map_or(0, |l| l.index));
                self.outbox.notify_one();
                return;
            }
        };
        let index = log_id.index;
        if index <= self.processed {
            return;
        }
        self.last_write.store(crate::group::now_ms(), Ordering::Relaxed);
        self.processed = index;
        self.presence.set_applied(index);
        let (Payload::Shard(cmd), Reply::Shard(result)) = (&payload, &reply) else {
            return;
        };
        let now = self.now();
        let presence = &mut self.presence;
        self.group
            .read(|s| presence.handle_committed(s, index, cmd, result, now));
        let outputs = self.presence.poll_outputs();
        // The barrier exists before its revocations go out: those to this group are answered
        // inline, during `deliver`.
        let asked = asked_acks(&outputs, self.id, index);
        // Every visibility-ending command gets a barrier, revocations or not: one that changed
        // nothing may be the retry of a change whose barrier is still pending here, and must
        // not be confirmed before it.
        let actor = cmd.ends_visibility().then(|| cmd.users().0);
        let strangers = actor.is_some() && cmd.strangers_user().is_some();
        if !asked.is_empty() || actor.is_some() || self.started.elapsed() < self.grace {
            let b = self.barriers.entry(index).or_insert_with(|| BarrierState {
                pending: Default::default(),
                sent: Vec::new(),
                resend_at: Instant::now() + RESEND_AFTER,
                not_before: self.started + self.grace,
                deadline: Instant::now() + ACK_WAIT,
                waiters: Vec::new(),
                actor,
                earlier_failed: false,
                strangers,
            });
            b.pending.extend(asked.iter().map(|(part, _, _)| *part));
            b.sent.extend(asked);
        }
        self.deliver(outputs);
        // Waiters that asked before this entry was processed.
        let ready: Vec<u64> = self.early.range(..=index).map(|(i, _)| *i).collect();
        for i in ready {
            for w in self.early.remove(&i).unwrap_or_default() {
                self.await_barrier(i, w);
            }
        }
        match cmd {
            Command::Deliver { source, seq, .. } => {
                let recent = self.delivered.entry(*source).or_default();
                recent.insert(*seq, index);
                while recent.len() > RECENT_DELIVERIES {
                    recent.pop_first();
                }
                let waiting = self.awaiting_delivery.remove(source).unwrap_or_default();
                let (done, still): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(s, _)| s <= seq);
                if !still.is_empty() {
                    self.awaiting_delivery.insert(*source, still);
                }
                for (_, w) in done {
                    self.await_barrier(index, w);
                }
            }
            c if c.is_two_sided() => self.outbox.notify_one(),
            _ => {}
        }
        self.settle_barriers();
    }

    fn await_barrier(&mut self, index: u64, w: Waiter) {
        if index > self.processed {
            self.early.entry(index).or_default().push(w);
            return;
        }
        match self.barriers.get_mut(&index) {
            Some(b) => b.waiters.push(w),
            None => self.after_grace(w),
        }
    }

    /// Answers `w` once the new-leader grace has passed: a change applied before this driver
    /// started had its revocations (if any) sent by a leader that may have died; viewer groups
    /// that still knew the user subscribe again within the grace and learn it then.
    fn after_grace(&mut self, w: Waiter) {
        let not_before = self.started + self.grace;
        if Instant::now() >= not_before {
            let _ = w.send(Ok(()));
            return;
        }
        // Index 0 is never an entry's: it holds the waiters of the grace itself.
        self.barriers
            .entry(0)
            .or_insert_with(|| BarrierState {
                pending: Default::default(),
                sent: Vec::new(),
                resend_at: not_before,
                not_before,
                deadline: not_before + ACK_WAIT,
                waiters: Vec::new(),
                actor: None,
                earlier_failed: false,
                strangers: false,
            })
            .waiters
            .push(w);
    }

    /// Answers the waiters of barriers that are complete, and fails those past their bound;
    /// sends again the revocations still unacknowledged after [`RESEND_AFTER`].
    fn settle_barriers(&mut self) {
        let now = Instant::now();
        let ranges = Arc::clone(&self.ctx.router.directory().view().ranges);
        let mut again = Vec::new();
        for b in self.barriers.values_mut() {
            if b.pending.is_empty() || now < b.resend_at {
                continue;
            }
            b.resend_at = now + RESEND_AFTER;
            b.resend(&ranges, &mut again);
        }
        for (to, msg) in again {
            tracing::debug!(group = self.id, to, "revocation unacknowledged: sent again");
            if to == self.id {
                self.deliver(vec![Output::Send { to, msg }]);
            } else {
                self.ctx.router.send(to, msg);
            }
        }
        let finished = settle_in_order(&mut self.barriers, now, self.presence.settled());
        for (i, ok) in finished {
            let Some(b) = self.barriers.remove(&i) else {
                continue;
            };
            tracing::debug!(group = self.id, index = i, actor = ?b.actor, ok, "barrier settled");
            let result = if ok {
                Ok(())
            } else {
                tracing::warn!(
                    group = self.id,
                    index = i,
                    unacknowledged = b.pending.len(),
                    earlier_failed = b.earlier_failed,
                    "revocations not acknowledged in time"
                );
                Err(ServiceError::unavailable(
                    "the change is committed and will take effect, but not every viewer's node confirmed it in time",
                ))
            };
            // Behind whatever the lease still holds (see `lease::Answer::Settled`).
            if !b.waiters.is_empty() {
                self.emit(Item::Answer(Answer::Settled(b.waiters, result)));
            }
        }
    }

    fn on_time(&mut self) {
        let now = Instant::now();
        if self.presence.settled() {
            self.introduce_again = None;
        } else if self.introduce_again.is_some_and(|t| now >= t) {
            self.presence.introduce_again();
            self.introduce_again = Some(now + crate::incarnation::RESEND_AFTER);
            let outputs = self.presence.poll_outputs();
            self.deliver(outputs);
        }
        self.settle_barriers();
        let ready = |s: &Starting, p: &Presence| {
            now >= s.deadline
                || match s.reply {
                    StartingReply::Strangers { .. } => !p.strangers_pending(s.user),
                    _ => !p.is_starting(s.user),
                }
        };
        if self.starting.iter().any(|s| ready(s, &self.presence)) {
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.starting)
                .into_iter()
                .partition(|s| ready(s, &self.presence));
            self.starting = waiting;
            for s in ready {
                let answer = match s.reply {
                    StartingReply::Location(r) => Answer::Location(s.user, r, self.ack(s.user, true)),
                    StartingReply::List { cursor, size, reply } => {
                        Answer::Page(s.user, reply, self.page(s.user, cursor.as_ref(), size))
                    }
                    StartingReply::Strangers { size, reply } => {
                        Answer::Strangers(reply, Ok(self.strangers(s.user, size)))
                    }
                };
                self.emit(Item::Answer(answer));
            }
        }
    }

    fn on_map(&mut self) {
        let view = self.map.borrow_and_update().clone();
        self.presence.set_ranges(Arc::clone(&view.ranges));
        let leaders = leaders_of(&view);
        // A group with a new leader, a new group (born of a split) and a group whose range
        // changed know none of our viewers that are theirs now.
        let changed: Vec<GroupId> = leaders
            .iter()
            .filter(|(g, l)| **g != self.id && self.leaders.get(g) != Some(*l))
            .map(|(g, _)| *g)
            .collect();
        let (before, after) = (
            self.leaders.get(&self.id).and_then(|l| l.2),
            leaders.get(&self.id).and_then(|l| l.2),
        );
        let mine_moved = before != after;
        self.leaders = leaders;
        let now = self.now();
        if mine_moved {
            // This group split: what it handed over is served by the new group from now on.
            let kept = self.group.read(|s| s.range());
            tracing::info!(group = self.id, range = %kept, "the group's range changed: handing over the rest");
            self.presence.hand_over(kept);
            // It absorbed a neighbour (a merge): its own viewers who follow the users that came
            // with it subscribed to the absorbed group, which is gone; they subscribe here now.
            if let (Some(b), Some(a)) = (before, after) {
                if a.end > b.end || a.start < b.start {
                    let presence = &mut self.presence;
                    self.group.read(|s| presence.resubscribe(s, self.id, None, now));
                }
            }
        }
        for g in changed {
            // Its new leader knows none of our viewers: subscribe them again.
            let presence = &mut self.presence;
            self.group.read(|s| presence.resubscribe(s, g, None, now));
        }
        let outputs = self.presence.poll_outputs();
        self.deliver(outputs);
    }

    fn on_msg(&mut self, msg: GroupMsg) {
        let now = self.now();
        match msg {
            GroupMsg::Message(GroupMessage::RevokeAck { barrier }) => self.acked(barrier),
            GroupMsg::Message(m) => {
                let presence = &mut self.presence;
                self.group.read(|s| presence.handle_message(s, m, now));
            }
            GroupMsg::Connect { user } => {
                let presence = &mut self.presence;
                self.group.read(|s| presence.handle_connect(s, user, None));
                self.activity
                    .online
                    .store(self.presence.online() as u64, Ordering::Relaxed);
            }
            GroupMsg::Disconnect { user } => {
                self.presence.handle_disconnect(user);
                self.activity
                    .online
                    .store(self.presence.online() as u64, Ordering::Relaxed);
            }
            GroupMsg::Location {
                user,
                loc,
                first,
                reply,
            } => {
                // The node stamps updates; two in the same millisecond must both count, so a
                // user's stamps strictly increase.
                let at = match self.presence.location(user) {
                    Some(prev) if prev.updated_at >= now => Millis(prev.updated_at.0 + 1),
                    _ => now,
                };
                let presence = &mut self.presence;
                let (accepted, record, store) = self.group.read(|s| {
                    let accepted = presence.handle_location(s, user, loc, at, now, first);
                    // A user a split handed over (served here until its session moves) is
                    // recorded in the new group's store, where its history now lives.
                    let store = match (s.split_seed(), s.frozen()) {
                        (Some(seed), _) if seed.range.contains(user) => seed.new_group,
                        // Frozen for a merge: the absorbing group's store gets its history.
                        (_, Some(into)) => into,
                        _ => self.id,
                    };
                    (accepted, s.user(user).is_some_and(|r| !r.history_off), store)
                });
                if accepted {
                    self.activity.updates.fetch_add(1, Ordering::Relaxed);
                }
                if accepted && record {
                    self.ctx.history.append(store, user, at, loc.lat(), loc.lon());
                }
                let outputs = self.presence.poll_outputs();
                self.deliver(outputs);
                if first && self.presence.is_starting(user) {
                    self.starting.push(Starting {
                        user,
                        deadline: Instant::now() + FIRST_PAGE_WAIT,
                        reply: StartingReply::Location(reply),
                    });
                } else {
                    // Under the lease, after the location's fan-out: a first page shows others'
                    // locations, and an update is acknowledged only once its fan-out has left.
                    // A leader that turns out to be deposed drops the fan-out and answers
                    // `moved`: the SDK sends the update again to the leader there is now.
                    let answer = Answer::Location(user, reply, self.ack(user, first));
                    self.emit(Item::Answer(answer));
                }
                return;
            }
            GroupMsg::List {
                user,
                cursor,
                size,
                reply,
            } => {
                if self.presence.is_starting(user) {
                    // Just connected: the friends' groups have not all answered yet.
                    self.starting.push(Starting {
                        user,
                        deadline: Instant::now() + FIRST_PAGE_WAIT,
                        reply: StartingReply::List { cursor, size, reply },
                    });
                } else {
                    let answer = Answer::Page(user, reply, self.page(user, cursor.as_ref(), size));
                    self.emit(Item::Answer(answer));
                }
                return;
            }
            GroupMsg::Strangers { user, size, reply } => {
                if !self.presence.can_list_strangers() {
                    let _ = reply.send(Err(ServiceError::unavailable(
                        "this node has no pseudonym key ([cluster] pseudonym_key): it lists no strangers",
                    )));
                    return;
                }
                let presence = &mut self.presence;
                let listening = self.group.read(|s| presence.listen_strangers(s, user, size));
                let outputs = self.presence.poll_outputs();
                self.deliver(outputs);
                if !listening {
                    let _ = reply.send(Err(ServiceError::new(
                        ErrorCode::NotStarted,
                        "no live location: send one first",
                    )));
                } else if self.presence.strangers_pending(user) {
                    self.starting.push(Starting {
                        user,
                        deadline: Instant::now() + FIRST_PAGE_WAIT,
                        reply: StartingReply::Strangers { size, reply },
                    });
                } else {
                    let answer = Answer::Strangers(reply, Ok(self.strangers(user, size)));
                    self.emit(Item::Answer(answer));
                }
                return;
            }
            GroupMsg::HasLocation { user, reply } => {
                let _ = reply.send(self.presence.location(user).is_some());
                return;
            }
            GroupMsg::CellCounts { max, reply } => {
                let _ = reply.send(self.presence.cell_counts(max));
                return;
            }
            GroupMsg::SetRadius { user, meters } => self.presence.set_radius(user, f64::from(meters)),
            GroupMsg::AwaitBarrier { index, reply } => {
                self.await_barrier(index, reply);
                return;
            }
            GroupMsg::AwaitDelivery { source, seq, reply } => {
                // The first delivery at or after `seq` carries it (a later intent of the same
                // pair supersedes it): its barrier is the one to wait for.
                let carried = self
                    .delivered
                    .get(&source)
                    .and_then(|recent| recent.range(seq..).next().map(|(_, index)| *index));
                match carried {
                    Some(index) => self.await_barrier(index, reply),
                    // Applied before this driver started: nothing of it is pending here.
                    _ if self.group.read(|s| s.delivered_from(source)) >= seq => self.after_grace(reply),
                    _ => self
                        .awaiting_delivery
                        .entry(source)
                        .or_default()
                        .push((seq, reply)),
                }
                return;
            }
            GroupMsg::Tick => {
                let presence = &mut self.presence;
                self.group.read(|s| presence.handle_tick(s, now));
            }
        }
        let outputs = self.presence.poll_outputs();
        self.deliver(outputs);
    }

    fn acked(&mut self, barrier: crate::presence::Barrier) {
        if barrier.index == RELAY_INDEX {
            // A listener group's part of a retraction this group relays as a channel.
            self.presence.relay_acked(barrier.part);
            let outputs = self.presence.poll_outputs();
            self.deliver(outputs);
            return;
        }
        if let Some(b) = self.barriers.get_mut(&barrier.index) {
            b.pending.remove(&barrier.part);
        }
        self.settle_barriers();
    }

    /// Lets `item` leave now if this node serves under its lease, holds it otherwise.
    fn emit(&mut self, item: Item) {
        let (ctx, outlet) = (&self.ctx, &mut self.outlet);
        self.lease.emit(item, &mut |item| release(ctx, outlet, item));
    }

    fn page(
        &self,
        user: UserId,
        cursor: Option<&nearby_index::query::Cursor>,
        size: usize,
    ) -> Result<nearby_client::proto::NearbyPage, ServiceError> {
        let (page, names) = self
            .presence
            .page(user, size, cursor)
            .ok_or_else(|| ServiceError::new(ErrorCode::NotStarted, "no live location: send one first"))?
            .map_err(|e| ServiceError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        // Everyone a viewer sees is a friend or someone it follows.
        Ok(self.group.read(|s| {
            let friends = s.user(user).map(|r| &r.friends);
            wire_page(page, names, |id| {
                if friends.is_some_and(|f| f.contains(id)) {
                    Relation::Friend
                } else {
                    Relation::Following
                }
            })
        }))
    }

    fn strangers(&self, user: UserId, size: usize) -> nearby_client::proto::StrangerPage {
        let (strangers, more) = self.group.read(|s| self.presence.strangers_page(s, user, size));
        nearby_client::proto::StrangerPage { strangers, more }
    }

    fn ack(&mut self, user: UserId, first: bool) -> Result<LocationAck, ServiceError> {
        let next_update_s = self.presence.tell_cadence(user);
        if first {
            let page = self.page(user, None, usize::from(self.ctx.config.page_size))?;
            return Ok(LocationAck::Started { page, next_update_s });
        }
        Ok(LocationAck::Located { next_update_s })
    }

    /// Delivers outputs: pushes to sessions, messages to this group inline (in order), to
    /// other groups through the router.
    fn deliver(&mut self, outputs: Vec<Output>) {
        let mut queue: VecDeque<Output> = outputs.into();
        let now = self.now();
        while let Some(out) = queue.pop_front() {
            match out {
                purge @ Output::Purge { .. } => {
                    // Whatever is held forgets the user now; whatever is queued goes now;
                    // whatever was held and is pushed later goes when it is released.
                    if let Output::Purge { viewer, about } = &purge {
                        self.lease.retract(*viewer, *about);
                    }
                    if self.lease.holds() {
                        self.emit(Item::Output(purge.clone()));
                    }
                    release(&self.ctx, &mut self.outlet, Item::Output(purge));
                }
                // Viewers in this group: acknowledged here once their fences are passed (through
                // the mailbox if they are not yet).
                Output::Send {
                    to,
                    msg: GroupMessage::RevokeAck { barrier },
                } if to == self.id => match self.outlet.ack_wait() {
                    None => self.acked(barrier),
                    Some(wait) => {
                        send_after(&self.ctx, wait, to, GroupMessage::RevokeAck { barrier });
                    }
                },
                Output::Send { to, msg } if to == self.id => {
                    let presence = &mut self.presence;
                    self.group.read(|s| presence.handle_message(s, msg, now));
                    queue.extend(self.presence.poll_outputs());
                }
                // A run's introduction and its confirmation carry nobody's data: with nothing
                // held for them to overtake, they leave at once (a sleeping group is not woken
                // by a lease round to confirm another group's new run).
                out @ Output::Send {
                    msg: GroupMessage::Started { .. } | GroupMessage::StartedAck { .. },
                    ..
                } if !self.lease.holds() => release(&self.ctx, &mut self.outlet, Item::Output(out)),
                // Events, messages to other groups (locations, acknowledgements): under the lease.
                out => self.emit(Item::Output(out)),
            }
        }
    }
}

/// The barriers that settle at `now`, in log order, and whether each succeeded: complete (every
/// part acknowledged, past its grace, and — for strangers — this run `settled`) or past its
/// deadline. A user's barrier waits for the user's earlier ones and fails if one of them
/// failed: a retried "hide" that changed nothing is confirmed only once the first one is.
fn settle_in_order(
    barriers: &mut BTreeMap<u64, BarrierState>,
    now: Instant,
    settled: bool,
) -> Vec<(u64, bool)> {
    let mut waiting: HashSet<UserId> = HashSet::new();
    let mut failed: HashSet<UserId> = HashSet::new();
    let mut finished = Vec::new();
    for (i, b) in barriers.iter_mut() {
        if b.actor.is_some_and(|a| failed.contains(&a)) {
            b.earlier_failed = true;
        }
        let blocked = b.actor.is_some_and(|a| waiting.contains(&a));
        let complete = b.pending.is_empty() && now >= b.not_before && !blocked && (settled || !b.strangers);
        if !complete && now < b.deadline {
            waiting.extend(b.actor);
            continue;
        }
        let ok = complete && !b.earlier_failed;
        if !ok {
            failed.extend(b.actor);
        }
        finished.push((*i, ok));
    }
    finished
}

/// The revocations in `outputs` that ask this group to acknowledge the change at `index`:
/// their parts, where they go, and the messages (to send again if unacknowledged).
fn asked_acks(outputs: &[Output], group: GroupId, index: u64) -> Vec<(u32, GroupId, GroupMessage)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                to,
                msg:
                    msg @ (GroupMessage::Revoke { ack: Some(b), .. }
                    | GroupMessage::Cell(CellMessage::Retract { ack: Some(b), .. })),
            } if b.group == group && b.index == index => Some((b.part, *to, msg.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Barrier;
    use nearby_client::proto::GoneReason;
    use nearby_raft::meta::initial_ranges;

    const LOW: UserId = 10;
    const HIGH: UserId = u64::MAX - 10;

    /// Groups 1 and 2, each half of the id space.
    fn ranges() -> RangeTable<GroupId> {
        let entries = initial_ranges(2).into_iter().map(|(g, r)| (r, g)).collect();
        RangeTable::new(entries).expect("ranges")
    }

    fn revoke(viewers: Vec<UserId>, part: u32) -> GroupMessage {
        GroupMessage::Revoke {
            from: 5,
            reason: GoneReason::Hidden,
            viewers,
            at: 9,
            ack: Some(Barrier {
                group: 3,
                index: 9,
                part,
            }),
        }
    }

    fn barrier(actor: Option<UserId>, parts: &[u32], deadline: Instant) -> BarrierState {
        BarrierState {
            pending: parts.iter().copied().collect(),
            sent: Vec::new(),
            resend_at: deadline,
            not_before: deadline.checked_sub(ACK_WAIT).unwrap_or(deadline),
            deadline,
            waiters: Vec::new(),
            actor,
            earlier_failed: false,
            strangers: false,
        }
    }

    #[test]
    fn a_users_barrier_settles_only_after_that_users_earlier_ones() {
        let now = Instant::now();
        let later = now + ACK_WAIT;
        let mut barriers = BTreeMap::new();
        // User 7's hide waits for a viewer group; its retry (changed nothing) waits for it;
        // user 8's change, acknowledged, does not.
        barriers.insert(10, barrier(Some(7), &[0], later));
        barriers.insert(11, barrier(Some(8), &[], later));
        barriers.insert(12, barrier(Some(7), &[], later));
        assert_eq!(settle_in_order(&mut barriers, now, true), vec![(11, true)]);
        barriers.remove(&11);
        if let Some(b) = barriers.get_mut(&10) {
            b.pending.clear();
        }
        assert_eq!(
            settle_in_order(&mut barriers, now, true),
            vec![(10, true), (12, true)]
        );
    }

    #[test]
    fn a_strangers_barrier_waits_until_every_group_confirmed_this_run() {
        let now = Instant::now();
        let mut barriers = BTreeMap::new();
        let mut discoverable_off = barrier(Some(7), &[], now + ACK_WAIT);
        discoverable_off.strangers = true;
        barriers.insert(10, discoverable_off);
        barriers.insert(11, barrier(Some(8), &[], now + ACK_WAIT));
        assert_eq!(settle_in_order(&mut barriers, now, false), vec![(11, true)]);
        barriers.remove(&11);
        assert_eq!(settle_in_order(&mut barriers, now, true), vec![(10, true)]);
        barriers.remove(&10);
        // Never confirmed in time: it fails at its deadline.
        let mut late = barrier(Some(7), &[], now);
        late.strangers = true;
        barriers.insert(12, late);
        assert_eq!(settle_in_order(&mut barriers, now, false), vec![(12, false)]);
    }

    #[test]
    fn a_users_barrier_fails_when_an_earlier_one_of_theirs_failed() {
        let now = Instant::now();
        let mut barriers = BTreeMap::new();
        // The first is past its deadline, unacknowledged: the retry fails with it, at once.
        barriers.insert(10, barrier(Some(7), &[0], now));
        barriers.insert(12, barrier(Some(7), &[], now + ACK_WAIT));
        barriers.insert(13, barrier(None, &[], now + ACK_WAIT));
        assert_eq!(
            settle_in_order(&mut barriers, now, true),
            vec![(10, false), (12, false), (13, true)]
        );
    }

    #[test]
    fn an_unacknowledged_revocation_is_sent_again_to_the_groups_its_viewers_are_in_now() {
        let ranges = ranges();
        let now = Instant::now();
        let mut b = BarrierState {
            pending: [0, 1, 2].into_iter().collect(),
            sent: vec![
                // Sent to group 1, its viewers now in both groups (a split the sender had
                // not seen): one new part per group.
                (0, 1, revoke(vec![LOW, HIGH], 0)),
                // Sent to group 1, its viewer now in group 2: the same part, to group 2.
                (1, 1, revoke(vec![HIGH], 1)),
                // Acknowledged: not sent again.
                (2, 2, revoke(vec![HIGH], 2)),
            ],
            resend_at: now,
            not_before: now,
            deadline: now + ACK_WAIT,
            waiters: Vec::new(),
            actor: None,
            earlier_failed: false,
            strangers: false,
        };
        b.pending.remove(&2);
        let mut out = Vec::new();
        b.resend(&ranges, &mut out);
        let sent: Vec<(GroupId, Vec<UserId>, u32)> = out
            .iter()
            .map(|(to, m)| match m {
                GroupMessage::Revoke {
                    viewers,
                    ack: Some(a),
                    ..
                } => (*to, viewers.clone(), a.part),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sent,
            vec![(1, vec![LOW], 3), (2, vec![HIGH], 4), (2, vec![HIGH], 1)]
        );
        let mut pending: Vec<u32> = b.pending.iter().copied().collect();
        pending.sort_unstable();
        assert_eq!(
            pending,
            vec![1, 3, 4],
            "the split part is replaced by its two halves"
        );
        // Sent again later, the new parts keep their numbers.
        let mut again = Vec::new();
        b.resend(&ranges, &mut again);
        assert_eq!(again.len(), 3);
    }
}
