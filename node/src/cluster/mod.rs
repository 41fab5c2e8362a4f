//! This node as a member of the cluster: how it starts (initialises a new cluster, joins one, or
//! restarts), how it keeps its copy of the map current, which replicas it hosts, which groups it
//! leads (and so runs drivers for), and — on the meta group's leader — how replicas and leaders
//! are placed.
//!
//! # Tasks
//!
//! - **map watcher**: a node with a meta replica reads the map from it on every apply; any
//!   other node long-polls a meta replica's node ([`PeerRequest::WatchMap`]). Every new map is
//!   installed in the [`Directory`] and saved to `DATA/cluster/map`.
//! - **replicas**: on every new map, opens the replicas the map places on this node (a new one
//!   is filled by its group's leader) — and refuses to go on if its files disagree with the map.
//! - **leadership**: one watcher per replica follows its Raft state. On becoming leader it
//!   confirms with a linearizable read (so everything committed before is applied), starts the
//!   group's driver and reports itself to the map; on losing it, stops the driver and tells the
//!   group's sessions to move to the new leader.
//! - **placement** (on the meta leader only): takes the next [`placement::Step`] towards the
//!   placement the rules ask for, one at a time.
//! - **liveness**: pings peers not heard from lately; the meta leader marks nodes that stay
//!   silent down, and up again when they answer.
//!
//! # Modules
//!
//! - `address`: a node back at new addresses updates its map entry; peers are dialled where the
//!   map says they are.
//! - [`identity`]: what the data directory remembers of the cluster.
//! - [`inbound`]: answers peers' requests.
//! - [`invite`]: adding a node by invitation (`nodectl add-node`).
//! - [`leave`]: stopping without an election (a node cordons itself on SIGTERM and undrains
//!   itself once it is back).
//! - [`operate`]: what operators ask of the cluster (the admin API's figures and steps).
//! - [`ops`]: the long operator steps in flight, and the groups they hold.
//! - [`placement`]: the placement rules, as a pure planner.
//! - [`rebalance`]: evening out the leaders' load (`nodectl rebalance`), as a pure planner and a
//!   pace.

mod address;
pub mod clocks;
pub mod identity;
pub mod inbound;
pub mod invite;
pub mod leave;
pub mod operate;
pub mod ops;
pub mod placement;
pub mod rebalance;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nearby_index::friends::UserRange;
use nearby_raft::host::Manifest;
use nearby_raft::meta::{initial_ranges, MetaCommand, MetaResult, NodeState};
use nearby_raft::{GroupId, NodeId, NodeInfo, RaftHost, Reply, META_GROUP};
use openraft::ChangeMembers;
use tokio::task::JoinHandle;

use self::identity::Identity;
use self::placement::Step;
use crate::group::driver::{self, DriverContext, DriverTask};
use crate::group::hibernate::{Hibernation, IDLE_AFTER};
use crate::group::Drivers;
use crate::queue::CloseReason;
use crate::route::directory::Directory;
use crate::route::peer::{PeerRequest, PeerResponse, Peers};
use crate::route::router::Router;
use crate::sessions::Sessions;

/// How long a node may stay silent before the meta leader marks it down.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);

/// How long a leader may go without hearing from a quorum before it stops serving its group's
/// sessions (it resumes once a linearizable read succeeds again). Shorter than the new-leader
/// grace ([`crate::group::driver::RESUBSCRIBE_GRACE`]) minus an election timeout, so a deposed
/// leader stops before its successor acknowledges revocations it could not have seen.
pub const LEASE: Duration = Duration::from_millis(1_800);

/// How often a leader checks its lease.
const LEASE_CHECK: Duration = Duration::from_millis(250);

/// How often peers are pinged when nothing else was heard from them.
pub const PING_EVERY: Duration = Duration::from_millis(500);

/// A peer silent this long is suspected dead: the sleeping groups it led wake to elect.
pub const SUSPECT: Duration = Duration::from_secs(2);

/// How long a leader waits for a follower to agree to hibernate.
const HIBERNATE_TIMEOUT: Duration = Duration::from_millis(300);

/// Placement steps (for distinct groups) carried out at once.
const PLACEMENT_ROUND: usize = 32;

/// How often replicas are checked for a split their log applied (see `follow_splits`).
const SPLIT_CHECK: Duration = Duration::from_millis(250);

/// How long a new replica may take to catch up before its step fails.
const CATCH_UP: Duration = Duration::from_secs(60);

/// The node-to-node protocol version that knows [`PeerRequest::HandOver`].
const HAND_OVER_PROTOCOL: u32 = 5;

/// How long a hand-over waits for the proposals under way before it holds new ones.
const HOLD_WITHIN: Duration = Duration::from_millis(500);

/// How long a leadership's successor may take to catch up before the transfer gives up.
const CAUGHT_UP_WITHIN: Duration = Duration::from_secs(2);

/// How long a node waits for a group's leader to hand its leadership over: the hold, the catch
/// up, the campaign, and a margin.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(6);

/// Why the node cannot take part in the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The data directory belongs elsewhere, or cannot be read.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The store refused.
    #[error(transparent)]
    Host(#[from] nearby_raft::error::HostError),
    /// The data directory is not part of a cluster and nothing says to make or join one.
    #[error("{0} is not part of a cluster: initialise a new one with `nearby-node init`, or give the node `join` addresses")]
    NotInitialised(String),
    /// `init` on a directory that already belongs to a cluster.
    #[error("this data directory already belongs to cluster {0}; `init` runs once per cluster")]
    AlreadyInitialised(String),
    /// No seed answered a join.
    #[error("could not join through {seeds:?}: {reason}")]
    Join {
        /// The addresses tried.
        seeds: Vec<String>,
        /// The last failure.
        reason: String,
    },
    /// The replica's files and the map disagree.
    #[error("group {group}: {reason}")]
    Mismatch {
        /// The group.
        group: GroupId,
        /// What disagrees.
        reason: String,
    },
    /// Setting up the cluster failed.
    #[error("{0}")]
    Setup(String),
}

/// How this node comes into its cluster on a fresh data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Only restart: the data directory must already belong to a cluster.
    Existing,
    /// Initialise a new cluster whose user-id space starts cut into this many shard groups.
    Init {
        /// Shard groups of the new cluster.
        groups: u64,
    },
    /// Join the cluster one of these nodes (Raft addresses) belongs to.
    Join(Vec<String>),
    /// Wait for a member's invitation (`nodectl add-node`), then join through the seeds it
    /// brings (see [`invite`]).
    AwaitInvitation,
}

/// The node's part in the cluster (see the module doc).
pub struct Cluster {
    me: NodeId,
    info: NodeInfo,
    host: Arc<RaftHost>,
    identity: Identity,
    directory: Arc<Directory>,
    drivers: Arc<Drivers>,
    router: Arc<Router>,
    driver_ctx: DriverContext,
    /// The drivers of the groups this node leads, with the term each leads in.
    running: tokio::sync::Mutex<HashMap<GroupId, (u64, DriverTask)>>,
    watched: Mutex<HashSet<GroupId>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    fatal: tokio::sync::watch::Sender<Option<String>>,
    started: Instant,
    ops: ops::Operations,
    invitation: Mutex<invite::Invitation>,
    /// The client service's counters.
    metrics: Arc<crate::metrics::ServiceMetrics>,
    /// The node's clock guard, if it has one (see `clocks`).
    clock_guard: Option<Arc<crate::clock::GuardedClock>>,
    /// The meta group removed this node's replica and the map does not show it yet: the
    /// replica is not opened again meanwhile (`watch_map`, `manage_replicas`).
    meta_left: std::sync::atomic::AtomicBool,
}

/// What [`Cluster::start`] needs.
pub struct ClusterOptions {
    /// The started store.
    pub host: Arc<RaftHost>,
    /// How peers and clients reach this node.
    pub info: NodeInfo,
    /// The node's data directory.
    pub data: std::path::PathBuf,
    /// What to do on a fresh data directory.
    pub bootstrap: Bootstrap,
    /// The node's sessions.
    pub sessions: Arc<Sessions>,
    /// The node's clock.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// The guard `clock` reads through, if any: fed the other nodes' offsets (see `clocks`).
    pub clock_guard: Option<Arc<crate::clock::GuardedClock>>,
    /// Client-facing settings (drivers use them).
    pub service: crate::api::ServiceConfig,
    /// The node's location history.
    pub history: Arc<crate::history::History>,
    /// The client service's counters (reported in [`Cluster::stats`]).
    pub metrics: Arc<crate::metrics::ServiceMetrics>,
}

impl Cluster {
    /// Brings the node into its cluster (see [`Bootstrap`]) and starts its tasks.
    pub async fn start(opts: ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        let me = opts.host.node_id();
        let identity = Identity::open(&opts.data, me)?;
        let cached = identity.map()?.unwrap_or_default();
        let directory = Arc::new(Directory::new(me, cached));
        let drivers = Arc::new(Drivers::default());
        let peers = Peers::new(Arc::clone(opts.host.transport()), Arc::clone(&directory));
        let hibernation = Arc::new(Hibernation::default());
        let router = Router::new(
            Arc::clone(&opts.host),
            Arc::clone(&directory),
            Arc::clone(&drivers),
            peers,
            Arc::clone(&hibernation),
        );
        // A replicated write wakes a sleeping follower.
        {
            let host = Arc::downgrade(&opts.host);
            let hibernation = Arc::clone(&hibernation);
            opts.host.transport().set_append_hook(Arc::new(move |group| {
                if hibernation.is_asleep(group) {
                    if let Some(g) = host.upgrade().and_then(|h| h.shard(group)) {
                        hibernation.wake(group, g.raft(), "a replicated write");
                    }
                }
            }));
        }
        // A sleeping replica votes only if its leader is gone (see `group::hibernate`).
        {
            let host = Arc::downgrade(&opts.host);
            let hibernation = Arc::clone(&hibernation);
            let peers = Arc::clone(router.peers());
            opts.host
                .transport()
                .set_vote_gate(Arc::new(move |group, candidate| {
                    if !hibernation.is_asleep(group) {
                        return true;
                    }
                    let Some(g) = host.upgrade().and_then(|h| h.shard(group)) else {
                        return true;
                    };
                    let leader = g.raft().server_metrics().borrow().current_leader;
                    match leader {
                        None => true,
                        Some(l) if l == candidate => true,
                        // This node leads the group, asleep and alive: no election is needed (a
                        // deliberate transfer wakes the group first).
                        Some(l) if l == me => false,
                        // The leader's node silent: this replica is about to wake for the same
                        // reason (the keep-alive loop); let the election go on now.
                        Some(l) => peers.last_ok(l).is_none_or(|t| t.elapsed() > SUSPECT),
                    }
                }));
        }
        // Nodes are dialled where the map says they are now (see `address`).
        opts.host
            .transport()
            .set_address_book(address::address_book(&directory));
        let driver_ctx = DriverContext {
            sessions: opts.sessions,
            router: Arc::clone(&router),
            clock: opts.clock,
            config: opts.service,
            history: Arc::clone(&opts.history),
        };
        let cluster = Arc::new(Cluster {
            me,
            info: opts.info,
            host: opts.host,
            identity,
            directory,
            drivers,
            router,
            driver_ctx,
            running: tokio::sync::Mutex::new(HashMap::new()),
            watched: Mutex::new(HashSet::new()),
            tasks: Mutex::new(Vec::new()),
            fatal: tokio::sync::watch::channel(None).0,
            started: Instant::now(),
            ops: ops::Operations::new(me),
            invitation: Mutex::new(invite::Invitation::NotWaiting),
            metrics: opts.metrics,
            clock_guard: opts.clock_guard,
            meta_left: std::sync::atomic::AtomicBool::new(false),
        });
        cluster
            .host
            .transport()
            .set_peer_handler(Arc::new(inbound::Inbound::new(Arc::downgrade(&cluster))));
        cluster.reopen_local_replicas().await?;
        match (cluster.identity.cluster()?, &opts.bootstrap) {
            (Some(id), Bootstrap::Init { .. }) => return Err(ClusterError::AlreadyInitialised(id)),
            (Some(id), _) => tracing::info!(cluster = %id, node = me, "restarting as a member"),
            (None, Bootstrap::Init { groups }) => cluster.init(*groups).await?,
            (None, Bootstrap::Join(seeds)) => cluster.join(seeds).await?,
            (None, Bootstrap::AwaitInvitation) => {
                let seeds = cluster.await_invitation().await;
                cluster.join(&seeds).await?
            }
            (None, Bootstrap::Existing) => {
                return Err(ClusterError::NotInitialised(opts.data.display().to_string()))
            }
        }
        cluster.check_against_map()?;
        cluster.spawn_tasks();
        Ok(cluster)
    }

    /// The node's clock.
    pub fn clock(&self) -> &Arc<dyn crate::clock::Clock> {
        &self.driver_ctx.clock
    }

    /// What the node's clock guard does, if it has one.
    pub fn clock_status(&self) -> Option<crate::clock::ClockStatus> {
        self.clock_guard.as_ref().map(|g| g.status())
    }

    /// The node's directory.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The node's drivers.
    pub fn drivers(&self) -> &Arc<Drivers> {
        &self.drivers
    }

    /// The node's location history.
    pub fn history(&self) -> &Arc<crate::history::History> {
        &self.driver_ctx.history
    }

    /// The router.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The node's store.
    pub fn host(&self) -> &Arc<RaftHost> {
        &self.host
    }

    /// Resolves with a reason if the node must stop (its files disagree with the map).
    pub fn fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// Opens every replica this node has files for, as their manifests say.
    async fn reopen_local_replicas(&self) -> Result<(), ClusterError> {
        for (group, manifest) in self.host.local_groups()? {
            match manifest {
                Manifest::Meta => {
                    self.host.open_meta().await?;
                }
                Manifest::Shard(range) => {
                    self.host.open_shard(group, range).await?;
                }
            }
        }
        Ok(())
    }

    /// Makes a new cluster with this node as its only member.
    async fn init(&self, groups: u64) -> Result<(), ClusterError> {
        let cluster_id = new_cluster_id();
        tracing::info!(cluster = %cluster_id, groups, "initialising a new cluster");
        let meta = self.host.open_meta().await?;
        let me: BTreeMap<NodeId, NodeInfo> = [(self.me, self.info.clone())].into();
        meta.initialize(me.clone()).await?;
        wait_leader(meta.raft(), self.me).await?;
        let ranges = initial_ranges(groups);
        let r = meta
            .propose(MetaCommand::Bootstrap {
                cluster: cluster_id.clone(),
                node: self.me,
                info: self.info.clone(),
                ranges: ranges.clone(),
            })
            .await
            .map_err(|e| ClusterError::Setup(format!("bootstrapping the map: {e}")))?;
        if let MetaResult::Rejected(e) = r {
            return Err(ClusterError::Setup(format!("bootstrapping the map: {e}")));
        }
        for (group, range) in ranges {
            let g = self.host.open_shard(group, range).await?;
            g.initialize(me.clone()).await?;
        }
        self.directory.install(meta.read(Clone::clone));
        self.identity.set_cluster(&cluster_id)?;
        self.identity.save_map(&self.directory.view().map)?;
        Ok(())
    }

    /// Joins the cluster through one of `seeds`.
    async fn join(&self, seeds: &[String]) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::from("no seed given");
        let mut attempt = 0u32;
        while Instant::now() < deadline {
            for seed in seeds {
                let addr = match self.host.transport().resolve(seed).await {
                    Ok(a) => a,
                    Err(e) => {
                        last = format!("cannot resolve {seed}: {e}");
                        continue;
                    }
                };
                let req = PeerRequest::Join {
                    info: self.info.clone(),
                };
                match self.router.peers().call_addr(addr, None, &req).await {
                    Ok(PeerResponse::Map(map)) if map.nodes.contains_key(&self.me) => {
                        let cluster_id = map.cluster.clone();
                        self.directory.install(*map);
                        self.identity.set_cluster(&cluster_id)?;
                        self.identity.save_map(&self.directory.view().map)?;
                        tracing::info!(cluster = %cluster_id, via = %seed, "joined the cluster");
                        return Ok(());
                    }
                    Ok(other) => last = format!("{seed} answered {other:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            attempt += 1;
            tracing::info!(attempt, reason = %last, "waiting to join the cluster");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(ClusterError::Join {
            seeds: seeds.to_vec(),
            reason: last,
        })
    }

    /// Refuses a map whose ranges disagree with this node's replica files.
    fn check_against_map(&self) -> Result<(), ClusterError> {
        let view = self.directory.view();
        for (group, manifest) in self.host.local_groups()? {
            let Manifest::Shard(range) = manifest else {
                continue;
            };
            if let Some(entry) = view.map.groups.get(&group) {
                // A split moves where a range ends (the map may be a step ahead of or behind
                // the group's own log), never where it starts.
                if entry.range.map(|r| r.start) != Some(range.start) {
                    return Err(ClusterError::Mismatch {
                        group,
                        reason: format!(
                            "this node's files hold the range {range}, but the cluster map says {}; refusing to start",
                            entry.range.map_or("no range".to_string(), |r| r.to_string())
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn spawn_tasks(self: &Arc<Self>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.push(tokio::spawn(Arc::clone(self).watch_map()));
        tasks.push(tokio::spawn(Arc::clone(self).save_maps()));
        tasks.push(tokio::spawn(Arc::clone(self).manage_replicas()));
        tasks.push(tokio::spawn(Arc::clone(self).keep_alive()));
        tasks.push(tokio::spawn(Arc::clone(self).place()));
        tasks.push(tokio::spawn(Arc::clone(self).follow_splits()));
        tasks.push(tokio::spawn(Arc::clone(self).come_back()));
        tasks.push(tokio::spawn(Arc::clone(self).check_clocks()));
        tasks.push(tokio::spawn(Arc::clone(self).announce_addresses()));
    }

    /// Carries out what splits ask of this node (see `docs/architecture.md`, "Splitting a
    /// range"): a replica whose group's log has split makes its replica of the new group from
    /// the seed (before anything else can open it) and records its own new range in its
    /// manifest; a group led here whose range shrank in the map moves the sessions of the
    /// users it handed over to the new group's leader. Checked on every new map and every
    /// [`SPLIT_CHECK`] (a split entry applies on its own schedule on each replica).
    async fn follow_splits(self: Arc<Self>) {
        let mut watch = self.directory.watch();
        let mut noted: HashMap<GroupId, UserRange> = HashMap::new();
        let mut served: HashMap<GroupId, UserRange> = HashMap::new();
        loop {
            let view = watch.borrow_and_update().clone();
            for g in self.host.shards() {
                let range = g.range();
                if noted.get(&g.id()) != Some(&range) {
                    match self.host.note_range(g.id()) {
                        Ok(()) => {
                            noted.insert(g.id(), range);
                        }
                        Err(e) => {
                            tracing::error!(group = g.id(), error = %e, "cannot record the group's range")
                        }
                    }
                }
                let Some(child) = g.read(|s| s.split_seed().map(|seed| seed.new_group)) else {
                    continue;
                };
                // Once the map says the split is done, a missing replica is an ordinary one
                // (its leader sends a snapshot), opened from the map.
                let settled = view.map.groups.get(&child).is_some_and(|e| e.born_of.is_none());
                if self.host.shard(child).is_some() || settled {
                    continue;
                }
                // Copied only now that the replica is to be made: the seed holds every record
                // the split handed over, and this runs every SPLIT_CHECK.
                let Some(seed) = g.read(|s| s.split_seed().cloned()) else {
                    continue;
                };
                let members: Option<BTreeMap<NodeId, NodeInfo>> = seed
                    .voters
                    .iter()
                    .map(|n| self.directory.node(*n).map(|info| (*n, info)))
                    .collect();
                let Some(members) = members else {
                    tracing::warn!(group = child, "a voter of the new group is not in the map yet");
                    continue;
                };
                // History first (its records of the handed-over users move to the new group's
                // store here): a crash before the replica exists repeats it harmlessly.
                let users: Vec<u64> = seed.users().map(|(u, _)| u).collect();
                match self.driver_ctx.history.hand_over(g.id(), child, users).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(parent = g.id(), group = child, records = n, "history handed over")
                    }
                    Err(e) => {
                        tracing::warn!(parent = g.id(), group = child, error = %e, "history not handed over")
                    }
                }
                // The parent's leader stands first: the handed-over users' sessions are there,
                // and replicas made later must not depose the leader made first.
                let stand_first = self.router.leads(g.id());
                match self.host.open_split_child(&seed, members, stand_first).await {
                    Ok(_) => {
                        tracing::info!(parent = g.id(), group = child, range = %seed.range, users = seed.len(), stand_first, "replica of a new group made from its split seed");
                        self.watch_leadership(child);
                    }
                    Err(e) => {
                        tracing::error!(parent = g.id(), group = child, error = %e, "cannot make the new group's replica")
                    }
                }
            }
            // Sessions of users a group led here handed over move to the new owner's leader.
            for (group, entry) in &view.map.groups {
                let Some(range) = entry.range else { continue };
                let led = self.drivers.get(*group).is_some();
                let before = served.insert(*group, range);
                if !led {
                    continue;
                }
                let Some(before) = before.filter(|b| b.start == range.start && b.end > range.end) else {
                    continue;
                };
                let Ok(gone) = UserRange::new(range.end, before.end) else {
                    continue;
                };
                let to = view
                    .map
                    .group_of(range.end)
                    .and_then(|g| self.directory.leader_client_addr(g));
                let moved = self
                    .driver_ctx
                    .sessions
                    .close_range(gone, &CloseReason::Moved { to: to.clone() });
                tracing::info!(group, handed_over = %gone, sessions = moved, to = ?to, "range handed over; sessions told to move");
            }
            let _ = tokio::time::timeout(SPLIT_CHECK, watch.changed()).await;
        }
    }

    /// Stops every task and driver (the store is stopped by its owner).
    pub async fn shutdown(&self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        let s = self.router.peers().stats();
        tracing::info!(
            envelopes = s.envelopes,
            updates = s.updates,
            batches = s.batches,
            dropped = s.dropped,
            "messages to peers since start"
        );
        let running: Vec<(GroupId, (u64, DriverTask))> = self.running.lock().await.drain().collect();
        for (g, (_, task)) in running {
            self.drivers.remove(g);
            task.stop().await;
        }
    }

    /// Keeps the directory's map current (see the module doc).
    async fn watch_map(self: Arc<Self>) {
        let mut rotate = 0usize;
        // Whether the open meta replica has seen this node in the group's membership: a new
        // replica catching up applies older memberships without it first, and is not "removed".
        let mut member_once = false;
        loop {
            if let Some(meta) = self.host.meta() {
                let membership = membership_of(meta.raft(), self.me);
                member_once |= membership == Membership::Member;
                let listed = self
                    .directory
                    .view()
                    .map
                    .groups
                    .get(&META_GROUP)
                    .is_some_and(|g| g.has_replica(self.me));
                // Removed: a drain took this node out of the meta group, and its replica gets
                // no more entries (not even the map's own record of the removal). Unwanted: a
                // replica that never became a member and that the map no longer places here.
                let removed = membership == Membership::NotMember && member_once;
                let unwanted = membership != Membership::Member && !listed;
                if removed || unwanted {
                    // Closed, and the map watched on the nodes that hold the group. Its
                    // leadership watcher ends with it; a replica opened here again later gets a
                    // new one.
                    tracing::info!(removed, "meta replica no longer this node's; closing it");
                    // Removed by the group before the map says so: until a map without this
                    // node's meta replica arrives, the map must not open it again (see
                    // `manage_replicas`).
                    if removed {
                        self.meta_left.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Stopped aside: a Raft core busy in a handler can take minutes to stop
                    // (seen: 158 s), and this loop is how the node hears of the map meanwhile —
                    // what tells it that its other replicas moved away (a drain's last step).
                    if let Some(raft) = self.host.detach_group(META_GROUP) {
                        tokio::spawn(nearby_raft::host::stop_raft(META_GROUP, raft));
                    }
                    self.watched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&META_GROUP);
                    member_once = false;
                    continue;
                }
                let mut applied = meta.watch_applied();
                let map = meta.read(Clone::clone);
                if map.is_bootstrapped() {
                    self.adopt(map);
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
                continue;
            }
            // No meta replica here: watch one that has it.
            let view = self.directory.view();
            let holders: Vec<NodeId> = view
                .map
                .groups
                .get(&META_GROUP)
                .map(|g| g.replicas().filter(|n| *n != self.me).collect())
                .unwrap_or_default();
            if holders.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let leader = self.directory.leader(META_GROUP).filter(|l| holders.contains(l));
            let node = leader.unwrap_or(holders[rotate % holders.len()]);
            rotate += 1;
            let req = PeerRequest::WatchMap {
                since: view.map.epoch,
                wait_ms: 4_000,
            };
            match self.router.peers().call(node, &req).await {
                Ok(PeerResponse::Map(map)) => self.adopt(*map),
                Ok(other) => tracing::debug!(node, ?other, "unexpected answer to a map watch"),
                Err(e) => {
                    tracing::debug!(node, error = %e, "map watch failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Installs `map` if it is newer than this node's ([`Cluster::save_maps`] saves it).
    fn adopt(&self, map: nearby_raft::ClusterMap) {
        self.directory.install(map);
    }

    /// Saves every map the directory installs to `DATA/cluster/map`, wherever it came from (the
    /// meta group, a map watch, a peer's answer to a stale request), so a restart begins from
    /// the newest map this node has seen. Runs as one of the node's tasks.
    async fn save_maps(self: Arc<Self>) {
        let mut watch = self.directory.watch();
        let mut saved = 0u64;
        loop {
            let view = Arc::clone(&watch.borrow_and_update());
            if view.map.epoch > saved {
                match self.identity.save_map(&view.map) {
                    Ok(()) => saved = view.map.epoch,
                    Err(e) => tracing::warn!(error = %e, "cannot save the cluster map"),
                }
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// Opens the replicas the map places here, and watches their leadership.
    async fn manage_replicas(self: Arc<Self>) {
        let mut watch = self.directory.watch();
        loop {
            let view = watch.borrow_and_update().clone();
            let meta_placed = view
                .map
                .groups
                .get(&META_GROUP)
                .is_some_and(|g| g.has_replica(self.me));
            if !meta_placed {
                self.meta_left.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            for (group, entry) in view.map.groups_of(self.me) {
                if group == META_GROUP && self.meta_left.load(std::sync::atomic::Ordering::Relaxed) {
                    // The group removed this node's replica and the map has not caught up: a
                    // replica opened again would never hear of its removal, and the node would
                    // read the map from it — a map that stops there, for minutes (a drain
                    // waited ~2–4 min for its last replicas to close).
                    continue;
                }
                if entry.born_of.is_some() && self.host.shard(group).is_none() {
                    // Made from its parent's split seed (`follow_splits`), never opened empty.
                    continue;
                }
                let opened = if group == META_GROUP {
                    self.host.open_meta().await.map(drop)
                } else {
                    match entry.range {
                        Some(range) => self.host.open_shard(group, range).await.map(drop),
                        None => continue,
                    }
                };
                match opened {
                    Ok(()) => {
                        self.settle_new_replica(group, entry.leader);
                        self.watch_leadership(group)
                    }
                    Err(nearby_raft::error::HostError::Mismatch { .. }) => {
                        let reason =
                            format!("the replica files of group {group} disagree with the cluster map");
                        tracing::error!(%reason);
                        self.fatal.send_replace(Some(reason));
                    }
                    Err(e) => tracing::error!(group, error = %e, "cannot open a replica"),
                }
            }
            // Replicas already open (from files) need watchers too; replicas the map no longer
            // places here are closed (their files stay until the operator's tools delete them).
            for g in self.host.shards() {
                let placed = view
                    .map
                    .groups
                    .get(&g.id())
                    .is_some_and(|e| e.has_replica(self.me));
                // A group a split made here, before the map shows it.
                let unborn = !view.map.groups.contains_key(&g.id())
                    && self
                        .host
                        .shards()
                        .iter()
                        .any(|p| p.read(|s| s.split_seed().is_some_and(|seed| seed.new_group == g.id())));
                if placed || unborn || !view.map.is_bootstrapped() {
                    self.watch_leadership(g.id());
                } else {
                    if let Some(into) = g.read(|s| s.frozen()) {
                        // Merged away: its users' history moves to the absorbing group's store.
                        let users: Vec<u64> = g.read(|s| s.users().map(|(u, _)| u).collect());
                        match self.driver_ctx.history.hand_over(g.id(), into, users).await {
                            Ok(n) => tracing::info!(
                                group = g.id(),
                                into,
                                records = n,
                                "merged away; history handed over"
                            ),
                            Err(e) => {
                                tracing::warn!(group = g.id(), into, error = %e, "history not handed over")
                            }
                        }
                    }
                    tracing::info!(group = g.id(), "replica moved off this node; closing it");
                    // Its sessions go to the leader of whatever group owns its users now (itself
                    // elsewhere, or the group that absorbed it).
                    let owner = view.map.group_of(g.range().start).unwrap_or(g.id());
                    self.stop_driver(g.id(), self.directory.leader(owner)).await;
                    self.host.close_group(g.id()).await;
                    self.watched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&g.id());
                }
            }
            if self.host.meta().is_some() {
                self.watch_leadership(META_GROUP);
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// A replica this node has just opened (after a restart, or a new one), of a group another
    /// node leads: it starts asleep, so that if its group sleeps it does not call an election
    /// for want of heartbeats; a write or the leader's silence wakes it.
    fn settle_new_replica(&self, group: GroupId, leader: Option<NodeId>) {
        if group == META_GROUP
            || self
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&group)
        {
            return;
        }
        if let (Some(l), Some(g)) = (leader, self.host.shard(group)) {
            if l != self.me {
                self.router.hibernation().sleep(group, g.raft());
            }
        }
    }

    fn watch_leadership(self: &Arc<Self>, group: GroupId) {
        if !self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group)
        {
            return;
        }
        let task = tokio::spawn(Arc::clone(self).follow_leadership(group));
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    /// Starts and stops `group`'s driver as this node gains and loses its leadership.
    async fn follow_leadership(self: Arc<Self>, group: GroupId) {
        let Some(raft) = self.host.raft_of(group) else {
            return;
        };
        // Server metrics change only with the vote, the role or the membership: no wake-up per
        // heartbeat.
        let mut metrics = raft.server_metrics();
        // The term whose leadership is confirmed (driver started, map told).
        let mut confirmed = None;
        let mut retry = Duration::from_millis(50);
        // Every group's check ticks on the same instants: one wake-up serves them all.
        let mut lease = nearby_raft::timers::aligned_interval(LEASE_CHECK);
        loop {
            let (leading, leader, term) = {
                let m = metrics.borrow_and_update();
                (
                    m.state.is_leader() && m.current_leader == Some(self.me),
                    m.current_leader,
                    m.vote.leader_id().get_term(),
                )
            };
            if let Some(l) = leader {
                self.directory.hint_leader(group, l, term);
            }
            let mut pending = false;
            if leading && confirmed != Some(term) {
                // Everything committed before this term is applied once a linearizable read
                // succeeds: the driver then starts from a complete state. A failed read (no
                // quorum yet) is retried while this node still leads.
                if raft.ensure_linearizable().await.is_ok() {
                    if group != META_GROUP {
                        self.start_driver(group, term).await;
                    }
                    confirmed = Some(term);
                    retry = Duration::from_millis(50);
                    self.report_leader(group, term);
                } else {
                    pending = true;
                }
            } else if !leading {
                confirmed = None;
                if group != META_GROUP {
                    self.stop_driver(group, leader).await;
                }
            }
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        if group != META_GROUP {
                            self.stop_driver(group, None).await;
                        }
                        return;
                    }
                }
                () = tokio::time::sleep(retry), if pending => {
                    retry = (retry * 2).min(Duration::from_secs(1));
                }
                _ = lease.tick(), if confirmed.is_some() && group != META_GROUP => {
                    // A leader cut off from its quorum must stop serving before a new leader's
                    // grace ends: its sessions would otherwise keep showing what the rest of
                    // the cluster has revoked.
                    if !self.holds_lease(group, &raft) {
                        tracing::warn!(group, "no quorum heard from lately: stepping back until confirmed again");
                        confirmed = None;
                        self.stop_driver(group, None).await;
                    } else if let Some(term) = confirmed {
                        self.maybe_sleep(group, &raft, term);
                    }
                }
            }
        }
    }

    /// Whether this leader of `group` may still serve: a quorum acknowledged it within
    /// [`LEASE`] — by Raft heartbeats while awake, by node-level liveness while asleep and just
    /// after waking (see [`crate::group::hibernate`]).
    fn holds_lease(&self, group: GroupId, raft: &nearby_raft::Raft) -> bool {
        let quiet = raft.metrics().borrow().millis_since_quorum_ack;
        if quiet.is_some_and(|ms| ms <= LEASE.as_millis() as u64) {
            return true;
        }
        if !self.router.hibernation().lease_from_liveness(group, LEASE) {
            return false;
        }
        let voters: Vec<NodeId> = raft
            .server_metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let heard = voters
            .iter()
            .filter(|n| {
                **n == self.me
                    || self
                        .router
                        .peers()
                        .last_ok(**n)
                        .is_some_and(|t| t.elapsed() <= LEASE)
            })
            .count();
        heard * 2 > voters.len()
    }

    /// Puts `group` to sleep if it led it with no write for [`IDLE_AFTER`]: its followers first,
    /// all at once, then — only if every follower that is alive agreed — its own timers. A
    /// follower left awake under a sleeping leader would hear no heartbeat and depose it.
    fn maybe_sleep(self: &Arc<Self>, group: GroupId, raft: &nearby_raft::Raft, term: u64) {
        let idle = self
            .drivers
            .get(group)
            .is_some_and(|d| d.idle_for() >= IDLE_AFTER);
        if !idle || !self.router.hibernation().may_try_sleep(group) {
            return;
        }
        let me = Arc::clone(self);
        let raft = raft.clone();
        tokio::spawn(async move {
            let peers = me.router.peers();
            // A node silent for SUSPECT is not waited for: its replica starts asleep when it
            // comes back (see `settle_new_replica`).
            let followers: Vec<NodeId> = raft
                .server_metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .filter(|n| *n != me.me && peers.last_ok(*n).is_some_and(|t| t.elapsed() <= SUSPECT))
                .collect();
            let ask = PeerRequest::Hibernate { group, term };
            let asks = followers
                .iter()
                .map(|node| peers.call_within(*node, &ask, HIBERNATE_TIMEOUT));
            let answers = futures::future::join_all(asks).await;
            let refused: Vec<_> = followers
                .iter()
                .zip(&answers)
                .filter(|(_, a)| !matches!(a, Ok(PeerResponse::Done)))
                .map(|(n, a)| format!("{n}: {a:?}"))
                .collect();
            let still = me.drivers.get(group).is_some_and(|d| d.idle_for() >= IDLE_AFTER)
                && raft.server_metrics().borrow().vote.leader_id().get_term() == term;
            if refused.is_empty() && still {
                me.router.hibernation().sleep(group, &raft);
            } else {
                tracing::debug!(group, ?refused, still, "not hibernating yet");
            }
        });
    }

    /// Starts the driver of `group`, led here in `term`. A driver of an earlier term is
    /// replaced: this node lost the leadership and won it back without its metrics showing the
    /// gap, and the other groups, told of the new term by the map, have forgotten what they
    /// knew of the old driver (its listeners, its subscriptions) — it must not carry on as if
    /// they had not.
    async fn start_driver(&self, group: GroupId, term: u64) {
        let earlier = match self.running.lock().await.get(&group) {
            Some((t, _)) if *t == term => return,
            Some((t, _)) => Some(*t),
            None => None,
        };
        if let Some(t) = earlier {
            tracing::info!(
                group,
                from = t,
                to = term,
                "leading again in a new term: restarting the driver"
            );
            self.stop_driver(group, None).await;
        }
        let mut running = self.running.lock().await;
        if running.contains_key(&group) {
            return;
        }
        let Some(replica) = self.host.shard(group) else {
            return;
        };
        let task = driver::spawn(replica, self.driver_ctx.clone(), term);
        self.drivers.insert(group, task.handle.clone());
        running.insert(group, (term, task));
        tracing::info!(group, term, "now leading this group");
    }

    async fn stop_driver(&self, group: GroupId, leader: Option<NodeId>) {
        let Some((_, task)) = self.running.lock().await.remove(&group) else {
            return;
        };
        self.drivers.remove(group);
        task.stop().await;
        let to = leader
            .filter(|l| *l != self.me)
            .and_then(|l| self.directory.node(l))
            .map(|n| n.client);
        let range = self
            .directory
            .view()
            .map
            .groups
            .get(&group)
            .and_then(|g| g.range)
            .or_else(|| self.host.shard(group).map(|g| g.range()));
        if let Some(range) = range {
            let moved = self
                .driver_ctx
                .sessions
                .close_range(range, &CloseReason::Moved { to: to.clone() });
            tracing::info!(group, sessions = moved, to = ?to, "no longer leading; sessions told to move");
        }
    }

    /// Records in the map that this node leads `group` in `term`, retrying in the background.
    fn report_leader(self: &Arc<Self>, group: GroupId, term: u64) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let cmd = MetaCommand::SetLeader {
                group,
                leader: me.me,
                term,
            };
            // Until it is recorded or this node no longer leads: other nodes route by the map.
            let mut attempt = 0u32;
            while me.router.leads(group) {
                match me.router.propose_meta(cmd.clone()).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::debug!(group, attempt, error = %e, "cannot report leadership yet");
                        tokio::time::sleep(Duration::from_millis(100u64 << attempt.min(4))).await;
                        attempt += 1;
                    }
                }
            }
        });
    }

    /// Pings quiet peers; on the meta leader, marks silent nodes down and returning ones up.
    async fn keep_alive(self: Arc<Self>) {
        let started = Instant::now();
        let mut every = nearby_raft::timers::aligned_interval(PING_EVERY);
        loop {
            every.tick().await;
            let view = self.directory.view();
            let peers = self.router.peers();
            for &node in view.map.nodes.keys().filter(|n| **n != self.me) {
                let quiet = peers.last_ok(node).is_none_or(|t| t.elapsed() >= PING_EVERY);
                if quiet {
                    let peers = Arc::clone(peers);
                    let epoch = view.map.epoch;
                    tokio::spawn(async move {
                        let _ = peers.call(node, &PeerRequest::Ping { epoch }).await;
                    });
                }
            }
            // A sleeping replica notices a dead leader only here: a leader's node silent for
            // SUSPECT wakes the local replicas of the groups it led, and only those.
            let silent = |node: NodeId| {
                peers
                    .last_ok(node)
                    .map_or(started.elapsed() > SUSPECT, |t| t.elapsed() > SUSPECT)
            };
            for g in self.host.shards() {
                if !self.router.hibernation().is_asleep(g.id()) {
                    continue;
                }
                let leader = g.raft().server_metrics().borrow().current_leader;
                if leader.is_none_or(|l| l != self.me && silent(l)) {
                    tracing::info!(group = g.id(), leader = ?leader, "the leader's node is silent: waking to elect");
                    self.router
                        .hibernation()
                        .wake(g.id(), g.raft(), "the leader's node is silent");
                }
            }
            if !self.router.leads(META_GROUP) || started.elapsed() < DOWN_AFTER {
                continue;
            }
            for (&node, entry) in &view.map.nodes {
                if node == self.me {
                    continue;
                }
                let alive = peers.last_ok(node).is_some_and(|t| t.elapsed() < DOWN_AFTER);
                let state = match (entry.state, alive) {
                    (NodeState::Up, false) => NodeState::Down,
                    (NodeState::Down, true) => NodeState::Up,
                    _ => continue,
                };
                tracing::info!(node, %state, "node state");
                let _ = self
                    .router
                    .propose_meta(MetaCommand::SetNodeState { node, state })
                    .await;
            }
        }
    }

    /// On the meta leader: placement in rounds of steps for distinct groups, each round's steps
    /// concurrently (see [`placement`]).
    async fn place(self: Arc<Self>) {
        let mut watch = self.directory.watch();
        let mut settled = false;
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(500), watch.changed()).await;
            if !self.router.leads(META_GROUP) {
                settled = false;
                continue;
            }
            let view = self.directory.view();
            // Groups an operator's operation is changing are left to it.
            let mut round = placement::plan_round(&view.map, PLACEMENT_ROUND, &self.ops.held());
            // Claimed until the round's steps are done (an operator's step on one of its groups
            // waits); a group an operation has held since the plan is left to it.
            let claim = self.ops.claim_for_placement(round.iter().map(Step::group));
            let planned = round.len();
            round.retain(|step| claim.covers(step.group()));
            if round.is_empty() && planned > 0 {
                continue;
            }
            if round.is_empty() {
                if !settled {
                    // Tools (`nearby-node dev`) wait for this line before saying "ready".
                    tracing::info!(
                        nodes = view.map.nodes.len(),
                        epoch = view.map.epoch,
                        "placement settled: every group replicated, leaders spread"
                    );
                    settled = true;
                }
                continue;
            }
            settled = false;
            tracing::info!(steps = round.len(), first = ?round[0], epoch = view.map.epoch, "placement round");
            let outcomes = futures::future::join_all(round.iter().map(|step| self.take(step))).await;
            drop(claim);
            let mut failed = 0;
            for (step, outcome) in round.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => tracing::debug!(?step, "placement step done"),
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(?step, error = %e, "placement step failed; will plan again");
                    }
                }
            }
            if failed > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn take(&self, step: &Step) -> Result<(), String> {
        // The map marks a node down only after DOWN_AFTER: a node silent for less is not given
        // anything (nor are groups woken for it) in the meantime.
        let target = match *step {
            Step::AddReplica { node, .. } => node,
            Step::RemoveReplica { .. } => self.me,
            Step::TransferLeader { to, .. } => to,
        };
        let answered = self
            .router
            .peers()
            .last_ok(target)
            .is_some_and(|t| t.elapsed() <= SUSPECT);
        if target != self.me && !answered {
            return Err(format!("node {target} has not answered lately"));
        }
        match *step {
            Step::AddReplica { group, node } => {
                // The map first: the node opens its replica when it sees itself in it.
                self.propose_map(MetaCommand::AddReplica {
                    group,
                    node,
                    voter: false,
                })
                .await?;
                let leader = self.directory.leader(group).ok_or("no leader")?;
                let req = PeerRequest::AddReplica {
                    epoch: self.directory.epoch(),
                    group,
                    node,
                };
                let answer = if leader == self.me {
                    self.add_replica_here(group, node).await
                } else {
                    match self
                        .router
                        .peers()
                        .call_within(leader, &req, CATCH_UP + Duration::from_secs(5))
                        .await
                    {
                        Ok(PeerResponse::Done) => Ok(()),
                        Ok(other) => Err(format!("{other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                };
                answer?;
                self.propose_map(MetaCommand::AddReplica {
                    group,
                    node,
                    voter: true,
                })
                .await
            }
            Step::RemoveReplica { group, node } => {
                let leader = self.directory.leader(group).ok_or("no leader")?;
                if leader == node {
                    return Err("the replica to remove leads the group".into());
                }
                let req = PeerRequest::RemoveReplica {
                    epoch: self.directory.epoch(),
                    group,
                    node,
                };
                let answer = if leader == self.me {
                    self.remove_replica_here(group, node).await
                } else {
                    match self.router.peers().call(leader, &req).await {
                        Ok(PeerResponse::Done) => Ok(()),
                        Ok(other) => Err(format!("{other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                };
                answer?;
                // The membership no longer has it; the map follows, and the node closes it.
                self.propose_map(MetaCommand::RemoveReplica { group, node }).await
            }
            Step::TransferLeader { group, to } => {
                match self.directory.leader(group) {
                    Some(l) if l == self.me => self.hand_over_here(group, to).await?,
                    Some(l) if l != to && self.active_protocol() >= HAND_OVER_PROTOCOL => {
                        let req = PeerRequest::HandOver { group, to };
                        match self.router.peers().call_within(l, &req, HAND_OVER_WITHIN).await {
                            Ok(PeerResponse::Done) => {}
                            Ok(other) => return Err(format!("{other:?}")),
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    _ => self.ask_to_stand(group, to).await?,
                }
                // Wait for the map to show the outcome before planning again.
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if self.directory.view().map.leader(group) == Some(to) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(format!("node {to} did not take over group {group}"))
            }
        }
    }

    /// On `group`'s leader: hands its leadership to `to`. Proposals are held (once those under
    /// way are answered) while `to` catches up with the whole log and stands, so its log misses
    /// nothing and its election cannot fail for that; a candidate missing an entry would depose
    /// this leader all the same (its term is higher), and the group would wait for the next
    /// election timeout with no leader (see `Replica::hold_writes`). The hold ends when the
    /// campaign does (at most two seconds later); the held proposals then reach the new leader
    /// (or, if the campaign failed, this one).
    pub(crate) async fn hand_over_here(&self, group: GroupId, to: NodeId) -> Result<(), String> {
        let raft = self.raft_of(group)?;
        let _held = self
            .host
            .hold_writes(group, HOLD_WITHIN)
            .await
            .ok_or_else(|| format!("group {group}'s proposals under way were not answered in time"))?;
        if raft.metrics().borrow().current_leader != Some(self.me) {
            return Err(format!("this node no longer leads group {group}"));
        }
        let last = raft.metrics().borrow().last_log_index.unwrap_or(0);
        if !caught_up(&raft, to, last, CAUGHT_UP_WITHIN).await {
            return Err(format!("node {to} is behind group {group}'s log"));
        }
        tracing::info!(group, to, last, "handing the leadership over; proposals held");
        self.stand(group, to).await
    }

    /// Asks `to` to stand for `group`'s leadership without holding the leader's proposals: when
    /// the leader is unknown, or a node does not speak [`HAND_OVER_PROTOCOL`] yet. `to` first
    /// waits (briefly) until it has applied what the leader had.
    async fn ask_to_stand(&self, group: GroupId, to: NodeId) -> Result<(), String> {
        if group != META_GROUP {
            if let Some(leader) = self.directory.leader(group).filter(|l| *l != to) {
                if let Some(index) = self.applied_on(leader, group).await {
                    let deadline = Instant::now() + CAUGHT_UP_WITHIN;
                    while self.applied_on(to, group).await.is_none_or(|a| a < index) {
                        if Instant::now() > deadline {
                            return Err(format!("node {to} is behind group {group}'s log"));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        self.stand(group, to).await
    }

    /// Wakes `group` (a sleeping group's replicas refuse votes while its leader is alive; the
    /// leader tells its followers) and asks `to` to stand.
    async fn stand(&self, group: GroupId, to: NodeId) -> Result<(), String> {
        tracing::info!(group, to, "waking the group for a leadership transfer");
        match self.directory.leader(group) {
            Some(l) if l == self.me => self.router.wake_group(group, "a leader transfer"),
            Some(l) => {
                let _ = self.router.peers().call(l, &PeerRequest::Wake { group }).await;
            }
            None => {}
        }
        match self
            .router
            .peers()
            .call(to, &PeerRequest::Campaign { group })
            .await
        {
            Ok(PeerResponse::Done) => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Proposes a change of the map and waits until this node's directory shows it, so the
    /// next step is planned from a map that includes this one.
    async fn propose_map(&self, cmd: MetaCommand) -> Result<(), String> {
        let epoch = match self.router.propose_meta(cmd).await {
            Ok(Reply::Meta(MetaResult::Rejected(e))) => return Err(e.to_string()),
            Ok(Reply::Meta(MetaResult::Changed { epoch })) => epoch,
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.directory.epoch() < epoch {
            if Instant::now() > deadline {
                return Err(format!("the map did not reach epoch {epoch} here"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// This node's Raft of `group` (shard or meta).
    /// The index `node`'s replica of shard group `group` has applied, if it answers.
    async fn applied_on(&self, node: NodeId, group: GroupId) -> Option<u64> {
        if node == self.me {
            return self
                .host
                .shard(group)
                .map(|g| g.last_applied().map_or(0, |l| l.index));
        }
        let req = PeerRequest::ReplicaState {
            group,
            users: Vec::new(),
        };
        match self.router.peers().call(node, &req).await {
            Ok(PeerResponse::Replica { applied, .. }) => Some(applied),
            _ => None,
        }
    }

    fn raft_of(&self, group: GroupId) -> Result<nearby_raft::Raft, String> {
        self.host
            .raft_of(group)
            .ok_or_else(|| "this node has no replica of the group".into())
    }

    /// On `group`'s leader: makes `node` a learner, waits until it has caught up, then a voter.
    pub(crate) async fn add_replica_here(&self, group: GroupId, node: NodeId) -> Result<(), String> {
        let raft = self.raft_of(group)?;
        let info = self.directory.node(node).ok_or("the node is not in the map")?;
        let already_voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node);
        if already_voter {
            return Ok(());
        }
        let added = raft
            .add_learner(node, info, false)
            .await
            .map_err(|e| e.to_string())?;
        if !caught_up(&raft, node, added.log_id.index, CATCH_UP).await {
            return Err(format!(
                "node {node} did not catch up with group {group} in {CATCH_UP:?}"
            ));
        }
        raft.change_membership(ChangeMembers::AddVoterIds([node].into()), false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(group, node, "replica added");
        Ok(())
    }

    /// On `group`'s leader: removes `node` from the group's voters and learners.
    pub(crate) async fn remove_replica_here(&self, group: GroupId, node: NodeId) -> Result<(), String> {
        let raft = self.raft_of(group)?;
        let present = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .any(|(n, _)| *n == node);
        if !present {
            return Ok(());
        }
        raft.change_membership(ChangeMembers::RemoveVoters([node].into()), false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(group, node, "replica removed");
        Ok(())
    }

    /// The range of `group`, as the map says.
    pub fn range_of(&self, group: GroupId) -> Option<UserRange> {
        self.directory.view().map.groups.get(&group).and_then(|g| g.range)
    }

    /// Waits until every group of the map has a leader somewhere, or `within` passes.
    pub async fn wait_for_leaders(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let view = self.directory.view();
            let all = view.map.is_bootstrapped()
                && view
                    .map
                    .groups
                    .keys()
                    .all(|g| self.directory.leader(*g).is_some());
            let mine_ready = view
                .map
                .groups
                .iter()
                .filter(|(g, _)| **g != META_GROUP && self.directory.leader(**g) == Some(self.me))
                .all(|(g, _)| self.drivers.get(*g).is_some());
            if all && mine_ready {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until this node leads the freshly initialised group of `raft`.
async fn wait_leader(raft: &nearby_raft::Raft, me: NodeId) -> Result<(), ClusterError> {
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(me, "this node leads the new group")
        .await
        .map(drop)
        .map_err(|e| ClusterError::Setup(format!("no leader for a new group: {e}")))
}

/// A fresh, random cluster identity.
fn new_cluster_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    let rng = ring::rand::SystemRandom::new();
    if rng.fill(&mut bytes).is_err() {
        // No randomness from the OS: the time is unique enough for an identity (not a secret).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = t.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `me` is being or has been taken out of the group `raft` replicates: its membership is
/// known (the replica has been initialised or has joined) and its newest configuration names it
/// neither as a voter nor as a learner. The newest half of a joint configuration counts: a
/// removed node takes part in the joint step but may never hear of the one that ends it.
/// Where a node stands in a replica's newest known membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Membership {
    /// No membership known yet (a replica that has applied nothing).
    Unknown,
    /// A voter or a learner.
    Member,
    /// Neither.
    NotMember,
}

fn membership_of(raft: &nearby_raft::Raft, me: NodeId) -> Membership {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let membership = metrics.membership_config.membership();
    match membership.get_joint_config().last() {
        None => Membership::Unknown,
        Some(newest) if newest.is_empty() => Membership::Unknown,
        Some(newest) if newest.contains(&me) || membership.learner_ids().any(|n| n == me) => {
            Membership::Member
        }
        Some(_) => Membership::NotMember,
    }
}

/// On a group's leader: waits until `node`'s replica has the log up to `index`, or `within`
/// passes (false then).
async fn caught_up(raft: &nearby_raft::Raft, node: NodeId, index: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let matched = raft
            .metrics()
            .borrow()
            .replication
            .as_ref()
            .and_then(|r| r.get(&node).copied().flatten())
            .map(|l| l.index);
        if matched.is_some_and(|m| m >= index) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
