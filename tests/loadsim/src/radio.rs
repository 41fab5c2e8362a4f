//! `nearby-loadsim radio`: what a phone's radio does for nearby, in real time on real QUIC —
//! location updates per online user per minute, UDP datagrams per online user per hour each way,
//! and how fresh the positions of friends nearby are at their viewers — for several client
//! *profiles* side by side against one cluster, so the battery-aware cadence and the NAT-safe
//! keep-alive are compared at equal conditions in one run.
//!
//! Time is not compressed: keep-alive timers, idle timeouts and the node's cadence are what is
//! measured. Each profile gets its own users in four equal classes: pairs of friends 500 m apart
//! (meeting up), 3 km apart (in range), 20 km apart (out of range), and users with no friend.
//! Everyone walks a few metres between updates, so each stays in their class.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nearby_client::proto::{Coord, Event};
use nearby_client::{LinkStats, LocationAck, SdkEvent};
use nearby_index::geo::UserId;
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::{ClusterError, ClusterOptions, ProcessCluster};

/// How one profile's clients behave.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    /// Its name in the report.
    pub name: String,
    /// `None`: obey the node's `next_update_s` and `Cadence` events; `Some(s)`: every `s`
    /// seconds whatever the node says.
    pub fixed_s: Option<u32>,
    /// QUIC keep-alive (a PING after this long without hearing anything).
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
}

impl Profile {
    /// Before this release: updates every 30 s, a keep-alive every 5 s, 20 s idle timeout.
    pub fn before() -> Profile {
        Profile {
            name: "fixed 30 s, keep-alive 5 s".into(),
            fixed_s: Some(30),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }

    /// Updates every 10 s for everyone: the freshness the policy gives friends close by, given
    /// to all.
    pub fn fixed_fast() -> Profile {
        Profile {
            name: "fixed 10 s, keep-alive 5 s".into(),
            fixed_s: Some(10),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }

    /// The cadence policy alone.
    pub fn cadence_only() -> Profile {
        Profile {
            name: "node's cadence, keep-alive 5 s".into(),
            fixed_s: None,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }

    /// This release's SDK defaults: the node's cadence and the NAT-safe keep-alive.
    pub fn after() -> Profile {
        Profile {
            name: "node's cadence, keep-alive 25 s (SDK default)".into(),
            fixed_s: None,
            keep_alive: nearby_client::tls::DEFAULT_KEEP_ALIVE,
            idle_timeout: nearby_client::tls::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What `radio` does.
#[derive(Clone, Debug)]
pub struct RadioConfig {
    /// Where the node's files go.
    pub dir: std::path::PathBuf,
    /// The `nearby-node` binary (default: next to this one).
    pub node_bin: Option<std::path::PathBuf>,
    /// Users per profile (rounded down to a multiple of 4).
    pub users: u32,
    /// How long the measurement lasts (after everyone connected).
    pub duration: Duration,
    /// The profiles compared.
    pub profiles: Vec<Profile>,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// One profile's results.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileReport {
    /// The profile.
    pub profile: Profile,
    /// Online users measured.
    pub users: u32,
    /// Location updates sent per user per minute, all classes.
    pub updates_per_user_min: f64,
    /// The same, per class: meeting (500 m), in range (3 km), out of range (20 km), alone.
    pub updates_per_user_min_by_class: [f64; 4],
    /// UDP datagrams phone → node per user per hour.
    pub datagrams_up_per_user_h: f64,
    /// UDP datagrams node → phone per user per hour.
    pub datagrams_down_per_user_h: f64,
    /// Bytes phone → node per user per hour.
    pub bytes_up_per_user_h: f64,
    /// Bytes node → phone per user per hour.
    pub bytes_down_per_user_h: f64,
    /// Mean age, in seconds, of the position a viewer holds of a friend 500 m away (sampled
    /// every second): how fresh "meeting up" is.
    pub near_friend_age_s: f64,
    /// The same for friends 3 km away.
    pub in_range_friend_age_s: f64,
    /// Reconnections (should be 0).
    pub reconnects: u64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct RadioReport {
    /// Measured for this long, seconds.
    pub seconds: f64,
    /// One entry per profile.
    pub profiles: Vec<ProfileReport>,
}

impl RadioReport {
    /// A markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| profile | updates / user / min (all; meeting, in range, out of range, alone) | datagrams / user / h (up, down) | KiB / user / h (up, down) | age of a friend 500 m away | 3 km away |\n|---|---|---|---|---|---|\n",
        );
        for p in &self.profiles {
            let c = p.updates_per_user_min_by_class;
            out.push_str(&format!(
                "| {} | {:.2} ({:.1}, {:.1}, {:.1}, {:.1}) | {:.0}, {:.0} | {:.1}, {:.1} | {:.1} s | {:.1} s |\n",
                p.profile.name,
                p.updates_per_user_min,
                c[0],
                c[1],
                c[2],
                c[3],
                p.datagrams_up_per_user_h,
                p.datagrams_down_per_user_h,
                p.bytes_up_per_user_h / 1024.0,
                p.bytes_down_per_user_h / 1024.0,
                p.near_friend_age_s,
                p.in_range_friend_age_s,
            ));
        }
        out
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The class of user `i`: pairs `(2k, 2k + 1)` are friends, and pair `k` is of class `k % 4`:
/// 0 meeting (500 m apart), 1 in range (3 km), 2 out of range (20 km), 3 alone (no friend).
fn class_of(i: u32) -> usize {
    ((i / 2) % 4) as usize
}

/// The position of user `i` of profile `p` at step `n`: each pair in its own spot, far from
/// every other; a few metres of walking back and forth per step.
fn position(p: usize, i: u32, n: u64) -> Coord {
    let pair = i / 2;
    let base_lat = -40.0 + (p as f64) * 20.0 + f64::from(pair / 40) * 0.6;
    let base_lon = -150.0 + f64::from(pair % 40) * 1.0;
    let gap_deg = match class_of(i) {
        0 => 0.0045, // 500 m
        1 => 0.027,  // 3 km
        2 => 0.18,   // 20 km
        _ => 0.0,
    };
    let side = if i.is_multiple_of(2) { 0.0 } else { gap_deg };
    let wobble = ((n % 20) as f64 - 10.0) * 0.000_02;
    Coord {
        lat: base_lat + side + wobble,
        lon: base_lon,
    }
}

struct Member {
    user: UserId,
    class: usize,
    friend: Option<UserId>,
}

#[derive(Default)]
struct Tally {
    updates: [AtomicU64; 4],
    reconnects: AtomicU64,
    age_sum_ms: [AtomicU64; 2],
    age_samples: [AtomicU64; 2],
    links: Mutex<Vec<LinkStats>>,
}

/// Runs the measurement (see the module doc).
pub async fn run(config: RadioConfig) -> Result<RadioReport, ClusterError> {
    let opts = match &config.node_bin {
        Some(bin) => ClusterOptions::with_binary(bin.clone(), &config.dir, 1, 4),
        None => ClusterOptions::new(&config.dir, 1, 4)?,
    };
    let cluster = Arc::new(ProcessCluster::start(opts).await?);
    let users = config.users / 8 * 8;
    let tallies: Vec<Arc<Tally>> = config
        .profiles
        .iter()
        .map(|_| Arc::new(Tally::default()))
        .collect();
    let start_at = Instant::now() + Duration::from_secs(5);
    let end_at = start_at + config.duration;
    let mut tasks = Vec::new();
    for (p, profile) in config.profiles.iter().enumerate() {
        // Distinct ids per profile, spread over the id space (and so over the groups).
        let id = |i: u32| (p as u64 + 1) * 1_000_000_007 + u64::from(i) * 104_729;
        for i in 0..users {
            let class = class_of(i);
            let friend = match class {
                3 => None,
                _ => Some(id(i ^ 1)),
            };
            let member = Member {
                user: id(i),
                class,
                friend,
            };
            let cluster = Arc::clone(&cluster);
            let tally = Arc::clone(&tallies[p]);
            let profile = profile.clone();
            tasks.push(tokio::spawn(async move {
                participant(cluster, profile, p, i, member, tally, start_at, end_at).await
            }));
        }
    }
    let started = std::time::Instant::now();
    if config.progress {
        let total = tasks.len();
        let tallies = tallies.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                let updates: u64 = tallies
                    .iter()
                    .flat_map(|t| t.updates.iter().map(|u| u.load(Ordering::Relaxed)))
                    .sum();
                #[allow(clippy::print_stderr)] // progress is this tool's interface
                {
                    eprintln!(
                        "radio: {:.0} s, {total} clients, {updates} updates so far",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        });
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = config.duration.as_secs_f64();
    let hours = seconds / 3600.0;
    let minutes = seconds / 60.0;
    let per_class = f64::from(users) / 4.0;
    let profiles = config
        .profiles
        .iter()
        .zip(&tallies)
        .map(|(profile, t)| {
            let by_class: [f64; 4] =
                std::array::from_fn(|c| t.updates[c].load(Ordering::Relaxed) as f64 / per_class / minutes);
            let links = t.links.lock().unwrap_or_else(|e| e.into_inner());
            let sum =
                |f: fn(&LinkStats) -> u64| links.iter().map(f).sum::<u64>() as f64 / f64::from(users) / hours;
            let age = |k: usize| {
                let n = t.age_samples[k].load(Ordering::Relaxed).max(1) as f64;
                t.age_sum_ms[k].load(Ordering::Relaxed) as f64 / n / 1000.0
            };
            ProfileReport {
                profile: profile.clone(),
                users,
                updates_per_user_min: by_class.iter().sum::<f64>() / 4.0,
                updates_per_user_min_by_class: by_class,
                datagrams_up_per_user_h: sum(|l| l.datagrams_sent),
                datagrams_down_per_user_h: sum(|l| l.datagrams_received),
                bytes_up_per_user_h: sum(|l| l.bytes_sent),
                bytes_down_per_user_h: sum(|l| l.bytes_received),
                near_friend_age_s: age(0),
                in_range_friend_age_s: age(1),
                reconnects: t.reconnects.load(Ordering::Relaxed),
            }
        })
        .collect();
    if let Ok(c) = Arc::try_unwrap(cluster) {
        c.stop().await;
    }
    Ok(RadioReport { seconds, profiles })
}

#[allow(clippy::too_many_arguments)] // one participant's whole setup, called once
async fn participant(
    cluster: Arc<ProcessCluster>,
    profile: Profile,
    p: usize,
    i: u32,
    member: Member,
    tally: Arc<Tally>,
    start_at: Instant,
    end_at: Instant,
) {
    let mut cfg = cluster.client_config(member.user, &[1]);
    cfg.keep_alive = profile.keep_alive;
    cfg.idle_timeout = profile.idle_timeout;
    let client = match cluster.connect(cfg).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(user = member.user, error = %e, "cannot connect");
            return;
        }
    };
    let Some(mut events) = client.events() else {
        return;
    };
    if let Some(friend) = member.friend {
        // Both ask: the second ask forms the friendship.
        for _ in 0..50 {
            if client.add_friend(friend).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut step = 0u64;
    let _ = client.update_location(position(p, i, step)).await;
    // The friend's position as this viewer holds it: its time.
    let held = Arc::new(AtomicU64::new(0));
    tokio::time::sleep_until(start_at).await;
    let base = client.link_stats();
    let mut wait = Duration::from_secs(u64::from(profile.fixed_s.unwrap_or(30)));
    let mut next = Instant::now() + wait;
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next.min(end_at)) => {
                if Instant::now() >= end_at {
                    break;
                }
                step += 1;
                match client.update_location(position(p, i, step)).await {
                    Ok(LocationAck::Located { next_update_s } | LocationAck::Started { next_update_s, .. }) => {
                        tally.updates[member.class].fetch_add(1, Ordering::Relaxed);
                        if profile.fixed_s.is_none() {
                            wait = Duration::from_secs(u64::from(next_update_s.max(1)));
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "update failed"),
                }
                next = Instant::now() + wait;
            }
            event = events.recv() => match event {
                Some(SdkEvent::Event(Event::FriendMoved(pos) | Event::FriendEntered(pos))) => {
                    held.store(pos.updated_at.0, Ordering::Relaxed);
                }
                Some(SdkEvent::Event(Event::Cadence { next_update_s })) if profile.fixed_s.is_none() => {
                    let sooner = Instant::now() + Duration::from_secs(u64::from(next_update_s.max(1)));
                    next = next.min(sooner);
                    wait = Duration::from_secs(u64::from(next_update_s.max(1)));
                }
                Some(SdkEvent::Reconnecting { .. }) => {
                    tally.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None => break,
            },
            _ = sample.tick() => {
                let at = held.load(Ordering::Relaxed);
                if at > 0 && member.class < 2 {
                    let age = now_ms().saturating_sub(at);
                    tally.age_sum_ms[member.class].fetch_add(age, Ordering::Relaxed);
                    tally.age_samples[member.class].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let mut used = client.link_stats();
    used.datagrams_sent -= base.datagrams_sent.min(used.datagrams_sent);
    used.datagrams_received -= base.datagrams_received.min(used.datagrams_received);
    used.bytes_sent -= base.bytes_sent.min(used.bytes_sent);
    used.bytes_received -= base.bytes_received.min(used.bytes_received);
    tally.links.lock().unwrap_or_else(|e| e.into_inner()).push(used);
    client.close().await;
}
