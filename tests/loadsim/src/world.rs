//! The synthetic world: users, a heavy-tailed friend graph with locality, one-way follower
//! grants, cities, who is online, privacy settings, and how each online user moves.
//!
//! Everything here is a pure function of [`WorldConfig`] (its `seed` included): the same
//! configuration gives the same world, byte for byte, on any machine, because every random draw
//! comes from a [`ChaCha8Rng`] (a stable stream, unlike `StdRng`, whose algorithm may change
//! between `rand` releases). Movement uses one stream per user, so a user's path does not depend
//! on how many others move or in what order. This module never reads a clock and never does I/O
//! (writing the seed file is [`nearby_raft::seed::Seed::write`]'s job).
//!
//! # The model
//!
//! - **Ids** are dense within [`ID_BLOCKS`] blocks that cut the whole `u64` space evenly: user
//!   `i` is number `i / 64` of block `i % 64`. Users land in every shard group whatever the
//!   node's ranges (any power-of-two cut up to 64 groups), and friend ids stay dense the way real
//!   ids are. (Friend sets are sorted id arrays, 8 bytes an id whatever the ids: the density
//!   no longer changes what memory measures.)
//! - **Cities**: `cities` dense discs of `city_radius_m` around real city centres, sized by a Zipf
//!   law (the first city is the largest). Users are placed uniformly in their city's disc.
//! - **Friends**: a Chung–Lu graph. Each user draws a weight from a Pareto law (α = 2.2, so a few
//!   users reach the cap — 5,000 by default) with mean `mean_degree` (lowered to `N/4` for small
//!   worlds); each of `Σw/2` edges picks one end in proportion to weight and the other, with
//!   probability `local_share`, in proportion to weight *within the first end's city*. Expected
//!   degrees follow the weights; self-loops and duplicates are dropped.
//! - **Followers**: `follow_share` × friendships extra one-way grants between non-friends.
//! - **Online**: `online` × N users, uniformly. Among them, `sharing_off` × online users hide
//!   from everyone (the driver turns sharing off for half of them and ghost mode on, until turned
//!   off, for the other half) and `hidden` × online users hide from one (preferably online)
//!   friend, so that a leak would be visible.
//! - **Movement**: random waypoints inside the user's city at walking (1.4 m/s) or driving
//!   (12 m/s, `drive_share` of users) speed; each update advances the user by `period_s`
//!   simulated seconds, however fast the run sends them.

use std::collections::HashSet;

use nearby_client::proto::Coord;
use nearby_index::geo::UserId;
use nearby_raft::seed::Seed;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How many evenly spaced blocks of dense ids the user-id space is cut into (see the module doc).
pub const ID_BLOCKS: u64 = 64;

/// Metres per degree of latitude (and of longitude at the equator), on the sphere the index uses.
const M_PER_DEG: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;

/// Walking speed, m/s.
pub const WALK_MPS: f64 = 1.4;
/// Driving speed in town, m/s.
pub const DRIVE_MPS: f64 = 12.0;

/// Real city centres (lat, lon); worlds with more cities reuse them, shifted north.
const CENTRES: [(f64, f64); 10] = [
    (52.5200, 13.4050), // Berlin
    (48.8566, 2.3522),  // Paris
    (40.4168, -3.7038), // Madrid
    (41.9028, 12.4964), // Rome
    (52.2297, 21.0122), // Warsaw
    (51.5074, -0.1278), // London
    (52.3676, 4.9041),  // Amsterdam
    (48.2082, 16.3738), // Vienna
    (50.0755, 14.4378), // Prague
    (59.3293, 18.0686), // Stockholm
];

/// Everything a world is generated from. Serialised next to the seed file so `run` can rebuild
/// the same world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// The random seed.
    pub seed: u64,
    /// Number of users.
    pub users: usize,
    /// Mean friend count asked for (lowered to `users / 4` for small worlds).
    pub mean_degree: f64,
    /// No user has more friends than this.
    pub max_degree: usize,
    /// Share of a user's friendships drawn inside their own city.
    pub local_share: f64,
    /// Number of cities.
    pub cities: usize,
    /// Radius of a city's disc, metres.
    pub city_radius_m: f64,
    /// One-way follower grants, as a share of the number of friendships.
    pub follow_share: f64,
    /// Share of users online.
    pub online: f64,
    /// Share of users who drive rather than walk.
    pub drive_share: f64,
    /// Share of online users with sharing off.
    pub sharing_off: f64,
    /// Share of online users hiding from one friend.
    pub hidden: f64,
    /// Share of online users discoverable by strangers nearby.
    #[serde(default = "default_discoverable")]
    pub discoverable: f64,
    /// Share of online users who look for strangers nearby.
    #[serde(default = "default_strangers")]
    pub strangers: f64,
    /// Simulated seconds between two updates of one user (what a phone would wait).
    pub period_s: f64,
    /// If not 0: the best-connected user is made a hub with this many friends (its city's
    /// users first, then anyone), and is online (see [`World::hub`]).
    #[serde(default)]
    pub hub_friends: usize,
}

fn default_discoverable() -> f64 {
    0.05
}

fn default_strangers() -> f64 {
    0.05
}

impl Default for WorldConfig {
    /// The product's sizing in shape (mean 400 friends, 10 % online, 30 s), at 10,000 users.
    fn default() -> Self {
        WorldConfig {
            seed: 1,
            users: 10_000,
            mean_degree: 400.0,
            max_degree: 5_000,
            local_share: 0.8,
            cities: 5,
            city_radius_m: 6_000.0,
            follow_share: 0.02,
            online: 0.1,
            drive_share: 0.3,
            sharing_off: 0.02,
            hidden: 0.02,
            discoverable: default_discoverable(),
            strangers: default_strangers(),
            period_s: 30.0,
            hub_friends: 0,
        }
    }
}

/// Why a world cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WorldError {
    /// A parameter is out of its range.
    #[error("world parameter `{name}` = {value}: {reason}")]
    Parameter {
        /// The parameter.
        name: &'static str,
        /// Its value, as text.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
}

fn check(ok: bool, name: &'static str, value: impl ToString, reason: &'static str) -> Result<(), WorldError> {
    if ok {
        Ok(())
    } else {
        Err(WorldError::Parameter {
            name,
            value: value.to_string(),
            reason,
        })
    }
}

fn share(name: &'static str, v: f64) -> Result<(), WorldError> {
    check((0.0..=1.0).contains(&v), name, v, "must be within 0..=1")
}

/// The radius the comparison counts a friend "near" within (the node's default radius).
pub const NEAR_M: f64 = 8_000.0;

/// The share of pairs of points drawn uniformly in one disc of `radius_m` that lie within
/// [`NEAR_M`] of each other (a fixed Monte Carlo sample: the same answer on every machine).
pub fn near_probability(radius_m: f64) -> f64 {
    if radius_m * 2.0 <= NEAR_M {
        return 1.0;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x6e65_6172);
    let point = |rng: &mut ChaCha8Rng| {
        // Uniform in the unit disc: radius by the square root.
        let (r, a) = (
            rng.random::<f64>().sqrt(),
            rng.random::<f64>() * std::f64::consts::TAU,
        );
        (r * a.cos(), r * a.sin())
    };
    const SAMPLES: u32 = 200_000;
    let near = (0..SAMPLES)
        .filter(|_| {
            let ((x1, y1), (x2, y2)) = (point(&mut rng), point(&mut rng));
            (x1 - x2).hypot(y1 - y2) * radius_m <= NEAR_M
        })
        .count();
    near as f64 / f64::from(SAMPLES)
}

impl WorldConfig {
    /// Sets the cities' radius (and, past what the current `local_share` allows, the local
    /// share) so that about `share` of friendships have both homes within [`NEAR_M`]: the seed's
    /// profile has ~40 online friends of whom only a part are near, while the dense-city default
    /// puts ~70 % of them within reach. Friendships across cities are never near (the cities are
    /// hundreds of km apart), so the share is `local_share` × the chance that two homes of one
    /// city lie within [`NEAR_M`]. The world's `friends_within_8km` reports what came out.
    pub fn with_near_share(mut self, share: f64) -> Result<Self, WorldError> {
        check(
            share.is_finite() && share > 0.0 && share <= 1.0,
            "near_share",
            share,
            "within 0 (exclusive) ..= 1",
        )?;
        if share > self.local_share {
            self.local_share = share;
        }
        let want = share / self.local_share;
        // The chance falls as the radius grows: bisect between a city that fits inside the
        // radius and the largest city allowed.
        let (mut lo, mut hi) = (NEAR_M / 2.0, 100_000.0);
        if near_probability(hi) > want {
            return Err(WorldError::Parameter {
                name: "near_share",
                value: share.to_string(),
                reason: "too small for cities of at most 100 km (lower local_share)",
            });
        }
        for _ in 0..30 {
            let mid = (lo + hi) / 2.0;
            if near_probability(mid) > want {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.city_radius_m = ((lo + hi) / 2.0).round();
        Ok(self)
    }

    /// Checks every parameter.
    pub fn validate(&self) -> Result<(), WorldError> {
        check(self.users >= 2, "users", self.users, "at least 2")?;
        check(
            (self.users as u64) < u64::MAX / 4,
            "users",
            self.users,
            "too many",
        )?;
        check(
            self.mean_degree.is_finite() && self.mean_degree >= 0.0,
            "mean_degree",
            self.mean_degree,
            "a finite number ≥ 0",
        )?;
        check(self.max_degree >= 1, "max_degree", self.max_degree, "at least 1")?;
        check((1..=100).contains(&self.cities), "cities", self.cities, "1..=100")?;
        check(
            self.city_radius_m.is_finite() && (100.0..=100_000.0).contains(&self.city_radius_m),
            "city_radius_m",
            self.city_radius_m,
            "100..=100000 metres",
        )?;
        check(
            self.period_s.is_finite() && self.period_s > 0.0,
            "period_s",
            self.period_s,
            "a positive number of seconds",
        )?;
        check(
            self.follow_share.is_finite() && (0.0..=1.0).contains(&self.follow_share),
            "follow_share",
            self.follow_share,
            "within 0..=1",
        )?;
        share("local_share", self.local_share)?;
        share("online", self.online)?;
        share("drive_share", self.drive_share)?;
        share("sharing_off", self.sharing_off)?;
        share("hidden", self.hidden)?;
        share("discoverable", self.discoverable)?;
        share("strangers", self.strangers)
    }

    /// The mean degree actually aimed at: `mean_degree`, at most `users / 4`.
    pub fn effective_mean_degree(&self) -> f64 {
        self.mean_degree.min(self.users as f64 / 4.0)
    }
}

/// A generated world (see the module doc).
#[derive(Clone, Debug)]
pub struct World {
    config: WorldConfig,
    step: u64,
    city: Vec<u16>,
    home: Vec<Coord>,
    friends: Vec<Vec<u32>>,
    follows: Vec<(u32, u32)>,
    online: Vec<u32>,
    sharing_off: Vec<u32>,
    hidden: Vec<(u32, u32)>,
    discoverable: Vec<u32>,
    listeners: Vec<u32>,
    hub: Option<u32>,
}

impl World {
    /// Generates the world of `config`.
    pub fn generate(config: WorldConfig) -> Result<World, WorldError> {
        config.validate()?;
        let n = config.users;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let step = (u64::MAX - 1) / ID_BLOCKS;

        // Cities, sized by a Zipf law.
        let k = config.cities;
        let city_weights: Vec<f64> = (0..k).map(|c| 1.0 / (c as f64 + 1.0)).collect();
        let city_cum = cumulative(&city_weights);
        let city: Vec<u16> = (0..n)
            .map(|_| pick(&city_cum, rng.random::<f64>()) as u16)
            .collect();
        let home: Vec<Coord> = city
            .iter()
            .map(|&c| point_in_disc(&mut rng, centre(c as usize), config.city_radius_m))
            .collect();

        // Friend weights: Pareto(α) with the wanted mean, capped.
        let max_deg = config.max_degree.min(n - 1) as f64;
        let mean = config.effective_mean_degree();
        let alpha = 2.2;
        let xm = mean * (alpha - 1.0) / alpha;
        let weights: Vec<f64> = (0..n)
            .map(|_| {
                let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                (xm / u.powf(1.0 / alpha)).min(max_deg)
            })
            .collect();
        let global = cumulative(&weights);
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
        for (i, &c) in city.iter().enumerate() {
            members[c as usize].push(i as u32);
        }
        let local: Vec<Vec<f64>> = members
            .iter()
            .map(|m| cumulative(&m.iter().map(|&i| weights[i as usize]).collect::<Vec<_>>()))
            .collect();
        let edges_wanted = (weights.iter().sum::<f64>() / 2.0).round() as u64;
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(edges_wanted as usize);
        if mean > 0.0 {
            for _ in 0..edges_wanted {
                let a = pick(&global, rng.random::<f64>()) as u32;
                let b = draw_partner(&mut rng, a, &city, &members, &local, &global, config.local_share);
                if a != b {
                    pairs.push((a.min(b), a.max(b)));
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        let mut friends: Vec<Vec<u32>> = vec![Vec::new(); n];
        for &(a, b) in &pairs {
            friends[a as usize].push(b);
            friends[b as usize].push(a);
        }
        for f in &mut friends {
            f.sort_unstable();
        }

        // One-way grants between non-friends.
        let follows_wanted = (pairs.len() as f64 * config.follow_share).round() as usize;
        let mut follow_set: HashSet<(u32, u32)> = HashSet::new();
        let mut tries = 0;
        while follow_set.len() < follows_wanted && tries < follows_wanted * 10 {
            tries += 1;
            let user = pick(&global, rng.random::<f64>()) as u32;
            let follower = draw_partner(
                &mut rng,
                user,
                &city,
                &members,
                &local,
                &global,
                config.local_share,
            );
            if user != follower && friends[user as usize].binary_search(&follower).is_err() {
                follow_set.insert((user, follower));
            }
        }
        let mut follows: Vec<(u32, u32)> = follow_set.into_iter().collect();
        follows.sort_unstable();

        // Online users, then settings among them.
        let online_n = ((n as f64 * config.online).round() as usize).min(n);
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in 0..online_n {
            let j = rng.random_range(i..n);
            order.swap(i, j);
        }
        let mut online: Vec<u32> = order[..online_n].to_vec();
        online.sort_unstable();
        let mut shuffled = online.clone();
        for i in 0..shuffled.len() {
            let j = rng.random_range(i..shuffled.len());
            shuffled.swap(i, j);
        }
        let off_n = (online_n as f64 * config.sharing_off).round() as usize;
        let hide_n = ((online_n as f64 * config.hidden).round() as usize).min(online_n - off_n.min(online_n));
        let mut sharing_off: Vec<u32> = shuffled[..off_n.min(online_n)].to_vec();
        sharing_off.sort_unstable();
        let online_set: HashSet<u32> = online.iter().copied().collect();
        let mut hidden = Vec::new();
        for &hider in shuffled.iter().skip(off_n).take(hide_n) {
            let fs = &friends[hider as usize];
            let online_friends: Vec<u32> = fs.iter().copied().filter(|f| online_set.contains(f)).collect();
            let pool = if online_friends.is_empty() {
                fs
            } else {
                &online_friends
            };
            if !pool.is_empty() {
                hidden.push((hider, pool[rng.random_range(0..pool.len())]));
            }
        }
        hidden.sort_unstable();

        // Strangers: drawn from a stream of their own, so the rest of a seed's world stays
        // what it was before they existed. Users with sharing off may be discoverable too
        // (and must then be seen by no stranger).
        let mut srng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5354_5241_4e47_4552);
        let mut discoverable = Vec::new();
        let mut listeners = Vec::new();
        for &i in &online {
            if srng.random::<f64>() < config.discoverable {
                discoverable.push(i);
            }
            if srng.random::<f64>() < config.strangers {
                listeners.push(i);
            }
        }

        let hub = (config.hub_friends > 0).then(|| {
            make_hub(
                config.seed,
                config.hub_friends,
                &city,
                &members,
                &follows,
                &mut friends,
                &mut online,
            )
        });

        Ok(World {
            config,
            step,
            city,
            home,
            friends,
            follows,
            online,
            sharing_off,
            hidden,
            discoverable,
            listeners,
            hub,
        })
    }

    /// The configuration the world was made from.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.friends.len()
    }

    /// Whether the world has no users (never: at least 2 are required).
    pub fn is_empty(&self) -> bool {
        self.friends.is_empty()
    }

    /// The id of user `i` (0-based index).
    pub fn id(&self, i: u32) -> UserId {
        let i = u64::from(i);
        1 + (i % ID_BLOCKS) * self.step + i / ID_BLOCKS
    }

    /// The index of user `id`, if it is one of the world's.
    pub fn index_of(&self, id: UserId) -> Option<u32> {
        let off = id.checked_sub(1)?;
        let (block, n) = (off / self.step, off % self.step);
        let i = n.checked_mul(ID_BLOCKS)?.checked_add(block)?;
        (block < ID_BLOCKS && i < self.len() as u64).then_some(i as u32)
    }

    /// User `i`'s city.
    pub fn city(&self, i: u32) -> usize {
        usize::from(self.city[i as usize])
    }

    /// User `i`'s friends (indices, ascending).
    pub fn friends(&self, i: u32) -> &[u32] {
        &self.friends[i as usize]
    }

    /// One-way grants `(user, follower)`: `follower` may see `user`.
    pub fn follows(&self) -> &[(u32, u32)] {
        &self.follows
    }

    /// Online users (indices, ascending).
    pub fn online(&self) -> &[u32] {
        &self.online
    }

    /// Online users who turn sharing off (indices, ascending).
    pub fn sharing_off(&self) -> &[u32] {
        &self.sharing_off
    }

    /// `(hider, friend)`: the hider hides from that friend.
    pub fn hidden(&self) -> &[(u32, u32)] {
        &self.hidden
    }

    /// Online users discoverable by strangers (indices, ascending).
    pub fn discoverable(&self) -> &[u32] {
        &self.discoverable
    }

    /// Online users who look for strangers (indices, ascending).
    pub fn listeners(&self) -> &[u32] {
        &self.listeners
    }

    /// The hub (`hub_friends`), if the world has one: an online user with that many friends.
    pub fn hub(&self) -> Option<u32> {
        self.hub
    }

    /// Number of friendships (each pair once).
    pub fn friendships(&self) -> usize {
        self.friends.iter().map(Vec::len).sum::<usize>() / 2
    }

    /// The import file: every user (named `u<index>`), friendship and grant.
    pub fn seed(&self) -> Seed {
        let users = (0..self.len() as u32)
            .map(|i| (self.id(i), format!("u{i}")))
            .collect();
        let mut friendships = Vec::with_capacity(self.friendships());
        for (a, fs) in self.friends.iter().enumerate() {
            for &b in fs.iter().filter(|&&b| b as usize > a) {
                friendships.push((self.id(a as u32), self.id(b)));
            }
        }
        let follows = self
            .follows
            .iter()
            .map(|&(u, f)| (self.id(u), self.id(f)))
            .collect();
        Seed {
            users,
            friendships,
            follows,
        }
    }

    /// How user `i` moves, starting at its home position.
    pub fn mover(&self, i: u32) -> Mover {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(u64::from(i) + 1);
        let drives = rng.random::<f64>() < self.config.drive_share;
        let c = centre(self.city(i));
        let target = point_in_disc(&mut rng, c, self.config.city_radius_m);
        Mover {
            pos: self.home[i as usize],
            target,
            centre: c,
            radius_m: self.config.city_radius_m,
            speed_mps: if drives { DRIVE_MPS } else { WALK_MPS },
            rng,
        }
    }

    /// Summary numbers, for reports.
    pub fn summary(&self) -> WorldSummary {
        let degrees: Vec<usize> = self.friends.iter().map(Vec::len).collect();
        let n = degrees.len().max(1) as f64;
        let radius = 8_000.0;
        let mut in_range = 0usize;
        let mut pairs = 0usize;
        for (a, fs) in self.friends.iter().enumerate() {
            for &b in fs {
                pairs += 1;
                let pa = nearby_index::geo::LatLng::new(self.home[a].lat, self.home[a].lon);
                let pb = nearby_index::geo::LatLng::new(self.home[b as usize].lat, self.home[b as usize].lon);
                if let (Ok(pa), Ok(pb)) = (pa, pb) {
                    if pa.distance_m(&pb) <= radius {
                        in_range += 1;
                    }
                }
            }
        }
        WorldSummary {
            seed: self.config.seed,
            users: self.len(),
            online: self.online.len(),
            friendships: self.friendships(),
            follows: self.follows.len(),
            mean_degree: degrees.iter().sum::<usize>() as f64 / n,
            max_degree: degrees.iter().copied().max().unwrap_or(0),
            users_over_1000_friends: degrees.iter().filter(|&&d| d > 1000).count(),
            friends_within_8km: if pairs == 0 {
                0.0
            } else {
                in_range as f64 / pairs as f64
            },
            cities: self.config.cities,
            sharing_off: self.sharing_off.len(),
            hidden_pairs: self.hidden.len(),
            discoverable: self.discoverable.len(),
            listeners: self.listeners.len(),
            period_s: self.config.period_s,
        }
    }
}

/// What a report says about the world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldSummary {
    /// The seed.
    pub seed: u64,
    /// Users.
    pub users: usize,
    /// Online users (sessions the run opens).
    pub online: usize,
    /// Friendships (pairs).
    pub friendships: usize,
    /// One-way grants.
    pub follows: usize,
    /// Mean friend count.
    pub mean_degree: f64,
    /// Largest friend count.
    pub max_degree: usize,
    /// Users with more than 1,000 friends.
    pub users_over_1000_friends: usize,
    /// Share of friendships whose two homes are within 8 km.
    pub friends_within_8km: f64,
    /// Cities.
    pub cities: usize,
    /// Online users with sharing off.
    pub sharing_off: usize,
    /// Hidden-from pairs.
    pub hidden_pairs: usize,
    /// Online users discoverable by strangers.
    #[serde(default)]
    pub discoverable: usize,
    /// Online users looking for strangers.
    #[serde(default)]
    pub listeners: usize,
    /// Simulated seconds between updates of one user.
    pub period_s: f64,
}

/// One user's random-waypoint walk (or drive) inside its city. Deterministic: its own stream.
#[derive(Clone, Debug)]
pub struct Mover {
    pos: Coord,
    target: Coord,
    centre: Coord,
    radius_m: f64,
    speed_mps: f64,
    rng: ChaCha8Rng,
}

impl Mover {
    /// Where the user is now.
    pub fn position(&self) -> Coord {
        self.pos
    }

    /// The user's speed, m/s.
    pub fn speed_mps(&self) -> f64 {
        self.speed_mps
    }

    /// Moves the user on by `dt_s` simulated seconds and returns the new position. Every call
    /// with `dt_s > 0` gives a new position (the user never stands still), which lets the oracle
    /// tell a user's updates apart by position.
    pub fn advance(&mut self, dt_s: f64) -> Coord {
        let mut left = self.speed_mps * dt_s;
        for _ in 0..64 {
            let (dx, dy) = offset_m(self.pos, self.target);
            let d = dx.hypot(dy);
            if d > left {
                let f = left / d;
                self.pos = shift(self.pos, dx * f, dy * f);
                return self.pos;
            }
            self.pos = self.target;
            left -= d;
            self.target = point_in_disc(&mut self.rng, self.centre, self.radius_m);
        }
        self.pos
    }
}

fn centre(c: usize) -> Coord {
    let (lat, lon) = CENTRES[c % CENTRES.len()];
    Coord {
        lat: lat + (c / CENTRES.len()) as f64 * 0.5,
        lon,
    }
}

/// East and north offsets from `a` to `b`, metres (local plane; cities are small).
fn offset_m(a: Coord, b: Coord) -> (f64, f64) {
    let dy = (b.lat - a.lat) * M_PER_DEG;
    let dx = (b.lon - a.lon) * M_PER_DEG * a.lat.to_radians().cos();
    (dx, dy)
}

fn shift(a: Coord, dx: f64, dy: f64) -> Coord {
    Coord {
        lat: a.lat + dy / M_PER_DEG,
        lon: a.lon + dx / (M_PER_DEG * a.lat.to_radians().cos()),
    }
}

fn point_in_disc(rng: &mut ChaCha8Rng, c: Coord, radius_m: f64) -> Coord {
    let r = radius_m * rng.random::<f64>().sqrt();
    let theta = rng.random::<f64>() * std::f64::consts::TAU;
    shift(c, r * theta.cos(), r * theta.sin())
}

/// Makes the best-connected user (lowest index among equals) a hub with `want` friends: users
/// of its city first, then anyone, in an order drawn from a stream of its own (so the rest of a
/// seed's world is what it is without a hub); never a user in a one-way grant with it. The hub
/// goes online. Returns its index.
fn make_hub(
    seed: u64,
    want: usize,
    city: &[u16],
    members: &[Vec<u32>],
    follows: &[(u32, u32)],
    friends: &mut [Vec<u32>],
    online: &mut Vec<u32>,
) -> u32 {
    let n = friends.len();
    let hub = (0..n)
        .max_by_key(|&i| (friends[i].len(), std::cmp::Reverse(i)))
        .unwrap_or(0) as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4855_4253);
    let shuffle = |mut v: Vec<u32>, rng: &mut ChaCha8Rng| {
        for i in 0..v.len() {
            let j = rng.random_range(i..v.len());
            v.swap(i, j);
        }
        v
    };
    let local = shuffle(members[city[hub as usize] as usize].clone(), &mut rng);
    let all = shuffle((0..n as u32).collect(), &mut rng);
    let granted: HashSet<u32> = follows
        .iter()
        .filter_map(|&(u, f)| (u == hub).then_some(f).or((f == hub).then_some(u)))
        .collect();
    let mut have: HashSet<u32> = friends[hub as usize].iter().copied().collect();
    for c in local.into_iter().chain(all) {
        if have.len() >= want.min(n - 1) {
            break;
        }
        if c == hub || granted.contains(&c) || !have.insert(c) {
            continue;
        }
        let theirs = &mut friends[c as usize];
        if let Err(at) = theirs.binary_search(&hub) {
            theirs.insert(at, hub);
        }
    }
    let mut mine: Vec<u32> = have.into_iter().collect();
    mine.sort_unstable();
    friends[hub as usize] = mine;
    if let Err(at) = online.binary_search(&hub) {
        online.insert(at, hub);
    }
    hub
}

/// Running sums of `w` (the last is the total).
fn cumulative(w: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x;
            acc
        })
        .collect()
}

/// The index whose cumulative interval holds `u · total`, `u` in `[0, 1)`.
fn pick(cum: &[f64], u: f64) -> usize {
    let total = cum.last().copied().unwrap_or(0.0);
    let x = u * total;
    cum.partition_point(|&c| c <= x).min(cum.len().saturating_sub(1))
}

fn draw_partner(
    rng: &mut ChaCha8Rng,
    a: u32,
    city: &[u16],
    members: &[Vec<u32>],
    local: &[Vec<f64>],
    global: &[f64],
    local_share: f64,
) -> u32 {
    let c = usize::from(city[a as usize]);
    if rng.random::<f64>() < local_share && members[c].len() > 1 {
        members[c][pick(&local[c], rng.random::<f64>())]
    } else {
        pick(global, rng.random::<f64>()) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> World {
        World::generate(WorldConfig {
            seed,
            users: 2_000,
            ..WorldConfig::default()
        })
        .expect("world")
    }

    #[test]
    fn a_near_share_sets_how_many_friends_live_within_reach() {
        for want in [0.2, 0.5, 0.9] {
            let config = WorldConfig {
                seed: 3,
                users: 2_000,
                ..WorldConfig::default()
            }
            .with_near_share(want)
            .expect("reachable share");
            let got = World::generate(config.clone())
                .expect("world")
                .summary()
                .friends_within_8km;
            assert!(
                (got - want).abs() < 0.06,
                "asked {want}, got {got} (city radius {} m, local share {})",
                config.city_radius_m,
                config.local_share
            );
        }
        assert!(WorldConfig::default().with_near_share(0.0).is_err());
        assert!(
            WorldConfig::default().with_near_share(0.001).is_err(),
            "needs cities over 100 km"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_world() {
        let (a, b) = (small(7), small(7));
        assert_eq!(a.seed(), b.seed());
        assert_eq!(a.online(), b.online());
        let (mut ma, mut mb) = (a.mover(3), b.mover(3));
        for _ in 0..50 {
            assert_eq!(ma.advance(30.0), mb.advance(30.0));
        }
        assert_ne!(small(8).seed(), a.seed());
    }

    #[test]
    fn the_graph_is_symmetric_heavy_tailed_and_local() {
        let w = small(1);
        let s = w.summary();
        // Mean is capped at N/4 = 500 > 400: the asked-for mean, less dropped duplicates.
        assert!(s.mean_degree > 250.0 && s.mean_degree < 450.0, "{s:?}");
        assert!(s.max_degree > 2 * s.mean_degree as usize, "{s:?}");
        assert!(s.friends_within_8km > 0.3, "{s:?}");
        for i in 0..w.len() as u32 {
            for &f in w.friends(i) {
                assert!(w.friends(f).binary_search(&i).is_ok());
                assert_ne!(f, i);
            }
        }
        for &(u, f) in w.follows() {
            assert!(w.friends(u).binary_search(&f).is_err());
        }
    }

    #[test]
    fn ids_spread_over_the_whole_space_and_map_back() {
        let w = small(1);
        let ids: Vec<u64> = (0..w.len() as u32).map(|i| w.id(i)).collect();
        let max = ids.iter().copied().max().unwrap_or(0);
        assert!(
            max > u64::MAX / 2 && max < u64::MAX,
            "ids do not reach the top of the space"
        );
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "ids repeat");
        // Dense within a block: users i and i + 64 are neighbours.
        assert_eq!(w.id(64), w.id(0) + 1);
        for i in [0u32, 1, 999, 1999] {
            assert_eq!(w.index_of(w.id(i)), Some(i));
        }
        assert_eq!(w.index_of(0), None);
        assert_eq!(w.index_of(w.id(1) + w.len() as u64), None);
    }

    #[test]
    fn small_worlds_scale_the_mean_down_and_settings_pick_online_users() {
        let w = World::generate(WorldConfig {
            users: 100,
            online: 0.5,
            sharing_off: 0.1,
            hidden: 0.1,
            ..WorldConfig::default()
        })
        .expect("world");
        assert!(w.summary().mean_degree <= 25.0);
        assert_eq!(w.online().len(), 50);
        assert_eq!(w.sharing_off().len(), 5);
        for &u in w.sharing_off() {
            assert!(w.online().binary_search(&u).is_ok());
        }
        for &(h, f) in w.hidden() {
            assert!(w.friends(h).binary_search(&f).is_ok());
        }
    }

    #[test]
    fn a_hub_gets_its_friends_both_ways_goes_online_and_leaves_the_rest_alone() {
        let plain = small(5);
        let w = World::generate(WorldConfig {
            seed: 5,
            users: 2_000,
            hub_friends: 1_500,
            ..WorldConfig::default()
        })
        .expect("world");
        let hub = w.hub().expect("a hub");
        assert_eq!(plain.hub(), None);
        assert_eq!(w.friends(hub).len(), 1_500);
        assert!(w.friends(hub).windows(2).all(|p| p[0] < p[1]));
        assert!(w
            .friends(hub)
            .iter()
            .all(|&f| w.friends(f).binary_search(&hub).is_ok()));
        assert!(w.online().binary_search(&hub).is_ok());
        // Its friends of its own city come first.
        let local = w
            .friends(hub)
            .iter()
            .filter(|&&f| w.city(f) == w.city(hub))
            .count();
        let city_size = (0..w.len() as u32).filter(|&i| w.city(i) == w.city(hub)).count();
        // (but for those in a one-way grant with it, who never become its friends)
        let granted = w
            .follows()
            .iter()
            .filter(|&&(u, f)| {
                (u == hub && w.city(f) == w.city(hub)) || (f == hub && w.city(u) == w.city(hub))
            })
            .count();
        assert!(
            local + granted >= (city_size - 1).min(1_500),
            "{local} (+{granted} granted) of {city_size}"
        );
        // Everything else is the world without a hub, but for the hub's new friendships.
        assert_eq!(w.follows(), plain.follows());
        assert_eq!(w.hidden(), plain.hidden());
        for i in (0..w.len() as u32).filter(|&i| i != hub) {
            let mut theirs: Vec<u32> = w.friends(i).iter().copied().filter(|&f| f != hub).collect();
            let mut before: Vec<u32> = plain.friends(i).iter().copied().filter(|&f| f != hub).collect();
            theirs.sort_unstable();
            before.sort_unstable();
            assert_eq!(theirs, before, "user {i}");
        }
    }

    #[test]
    fn movers_move_at_their_speed_and_stay_in_town() {
        let w = small(3);
        for i in 0..20 {
            let mut m = w.mover(i);
            let start = m.position();
            let next = m.advance(30.0);
            let d = nearby_index::geo::LatLng::new(start.lat, start.lon)
                .expect("ll")
                .distance_m(&nearby_index::geo::LatLng::new(next.lat, next.lon).expect("ll"));
            assert!(d > 0.0 && d <= m.speed_mps() * 30.0 + 1.0, "{d}");
            let c = centre(w.city(i));
            for _ in 0..200 {
                let p = m.advance(30.0);
                let (dx, dy) = offset_m(c, p);
                assert!(dx.hypot(dy) <= w.config().city_radius_m + 10.0);
            }
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = World::generate(WorldConfig {
            online: 1.5,
            ..WorldConfig::default()
        })
        .expect_err("bad");
        assert!(e.to_string().contains("online"), "{e}");
    }
}
