//! Relation and privacy changes during a run: the part of the load that tests the product's
//! promise rather than its speed.
//!
//! At a set rate, a *cycle* starts on a pair of online friends `(S, V)` that no other cycle
//! holds: `S` ends `V`'s permission to see it — hides from `V`, turns sharing off, or unfriends
//! `V` — waits a moment, and undoes it (unhides, turns sharing on, or both ask to be friends
//! again). A quarter of the cycles take a one-way grant instead (`V` follows `S`, not a friend):
//! `S` revokes it and grants it again. Each change is recorded with its send and acknowledgement times for the oracle
//! ([`crate::oracle::Change`]), which counts as a leak any event about `S` reaching `V` after a
//! forbidding change was acknowledged to `S` and before it was undone. Requests refused as
//! retryable (a leader being elected) are sent again, within a bound; each cycle reports whether
//! the pair ended as it started, for the check of every replica at the end.
//!
//! Pairs whose permissions were already special before the run (sharing off, hiding, one-way
//! grants) are left alone, so every change is the only one in effect for its pair.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nearby_client::proto::Outcome as Done;
use nearby_client::{Client, ClientError};
use nearby_index::geo::UserId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use crate::driver::{lock, Shared};
use crate::oracle::{Change, Micros, Scope};
use crate::world::World;

/// How a cycle forbids and allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Hide from the friend, then unhide.
    Hide,
    /// Sharing off, then on (every viewer of the sender).
    SharingOff,
    /// Unfriend, then both ask again.
    Unfriend,
    /// Revoke a follower's grant, then grant it again.
    Follower,
}

/// One cycle, as it went.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cycle {
    /// What it did.
    pub kind: Kind,
    /// The sender (its user id).
    pub sender: UserId,
    /// The friend (its user id).
    pub viewer: UserId,
    /// Whether every request of the cycle was acknowledged: the pair ended as it started.
    pub restored: bool,
}

/// Which pairs a run's churn may use, and how often.
pub struct Plan {
    /// Candidate pairs (participants `S`, `V`): friends, both online.
    pairs: Vec<(u32, u32)>,
    /// Candidate grants (participants `S`, `V`): `V` follows `S`, both online.
    grants: Vec<(u32, u32)>,
    /// Participant → the participants that may see it before the run.
    audience: HashMap<u32, Vec<u32>>,
    rate: f64,
    seed: u64,
}

impl Plan {
    /// The plan for `world`'s participants; `special[p]` marks participants left alone.
    pub fn new(world: &World, special: &[bool], rate: f64, seed: u64) -> Plan {
        let online = world.online();
        let part: HashMap<u32, u32> = online.iter().enumerate().map(|(p, &i)| (i, p as u32)).collect();
        let follows: HashSet<(u32, u32)> = world
            .follows()
            .iter()
            .flat_map(|&(a, b)| [(a, b), (b, a)])
            .collect();
        let mut pairs = Vec::new();
        let mut audience: HashMap<u32, Vec<u32>> = HashMap::new();
        for (p, &i) in online.iter().enumerate() {
            let p = p as u32;
            let friends: Vec<u32> = world
                .friends(i)
                .iter()
                .filter_map(|f| part.get(f).copied())
                .collect();
            audience.insert(p, friends.clone());
            if special.get(p as usize).copied().unwrap_or(true) {
                continue;
            }
            for &f in world.friends(i) {
                let Some(&v) = part.get(&f) else { continue };
                let clean = !follows.contains(&(i, f)) && !special.get(v as usize).copied().unwrap_or(true);
                if clean && p < v {
                    pairs.push((p, v));
                }
            }
        }
        let clean = |p: u32| !special.get(p as usize).copied().unwrap_or(true);
        let grants = world
            .follows()
            .iter()
            .filter_map(|&(user, follower)| Some((*part.get(&user)?, *part.get(&follower)?)))
            .filter(|&(s, v)| clean(s) && clean(v))
            .collect();
        Plan {
            pairs,
            grants,
            audience,
            rate,
            seed,
        }
    }

    /// Candidate pairs.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Candidate grants.
    pub fn grants(&self) -> usize {
        self.grants.len()
    }
}

/// Runs cycles from `start` until shortly before `end`; returns them once all have finished.
pub(crate) async fn run(shared: Arc<Shared>, plan: Plan, start: Instant, end: Instant) -> Vec<Cycle> {
    if plan.pairs.is_empty() || plan.rate <= 0.0 {
        return Vec::new();
    }
    tokio::time::sleep_until(start).await;
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let busy: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / plan.rate);
    let mut tasks = Vec::new();
    let mut next = start;
    // A cycle takes up to ~3 s: none starts that could not finish inside the steps.
    while next + Duration::from_secs(3) < end {
        tokio::time::sleep_until(next).await;
        next += interval;
        let kind = match rng.random_range(0..4) {
            0 => Kind::Hide,
            1 => Kind::SharingOff,
            2 => Kind::Unfriend,
            _ if plan.grants.is_empty() => Kind::Unfriend,
            _ => Kind::Follower,
        };
        let pick = (0..20).find_map(|_| {
            let (s, v) = match kind {
                // A grant goes one way: its giver changes it.
                Kind::Follower => plan.grants[rng.random_range(0..plan.grants.len())],
                _ => {
                    let (s, v) = plan.pairs[rng.random_range(0..plan.pairs.len())];
                    if rng.random_bool(0.5) {
                        (s, v)
                    } else {
                        (v, s)
                    }
                }
            };
            let mut b = lock(&busy);
            (!b.contains(&s) && !b.contains(&v)).then(|| {
                b.insert(s);
                b.insert(v);
                (s, v)
            })
        });
        let Some((s, v)) = pick else { continue };
        let pause = Duration::from_millis(rng.random_range(300..1_500));
        let viewers = match kind {
            Kind::SharingOff => plan.audience.get(&s).cloned().unwrap_or_default(),
            _ => vec![v],
        };
        let shared = Arc::clone(&shared);
        let busy = Arc::clone(&busy);
        tasks.push(tokio::spawn(async move {
            let cycle = cycle(&shared, kind, s, v, viewers, pause).await;
            let mut b = lock(&busy);
            b.remove(&s);
            b.remove(&v);
            cycle
        }));
    }
    let mut cycles = Vec::new();
    for t in tasks {
        if let Ok(Some(c)) = t.await {
            cycles.push(c);
        }
    }
    cycles
}

/// Sends `request` until it is answered, retrying refusals that say "retry" for up to 10 s;
/// returns the first send time and, if it was acknowledged, the acknowledgement time.
async fn acknowledged<F, Fut>(shared: &Shared, mut request: F) -> (Micros, Option<Micros>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Done, ClientError>>,
{
    let sent = shared.now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match request().await {
            Ok(_) => return (sent, Some(shared.now())),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                shared.error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                shared.error(&e);
                return (sent, None);
            }
        }
    }
}

fn record(
    shared: &Shared,
    sender: u32,
    viewers: Vec<u32>,
    allowed: bool,
    by_sender: bool,
    scope: Scope,
    times: (Micros, Option<Micros>),
) {
    lock(&shared.changes).push(Change {
        sender,
        viewers,
        allowed,
        by_sender,
        scope,
        sent: times.0,
        acked: times.1,
    });
}

async fn cycle(
    shared: &Shared,
    kind: Kind,
    s: u32,
    v: u32,
    viewers: Vec<u32>,
    pause: Duration,
) -> Option<Cycle> {
    let (cs, cv): (Client, Client) = {
        let clients = lock(&shared.clients);
        (clients.get(&s)?.clone(), clients.get(&v)?.clone())
    };
    let (ids, idv) = (shared.ids[s as usize], shared.ids[v as usize]);
    let restored = match kind {
        Kind::Hide => {
            let off = acknowledged(shared, || cs.hide(idv)).await;
            record(shared, s, vec![v], false, true, Scope::Viewers, off);
            tokio::time::sleep(pause).await;
            let on = acknowledged(shared, || cs.unhide(idv)).await;
            record(shared, s, vec![v], true, true, Scope::Viewers, on);
            off.1.is_some() && on.1.is_some()
        }
        Kind::SharingOff => {
            let off = acknowledged(shared, || cs.set_sharing(false)).await;
            record(shared, s, viewers.clone(), false, true, Scope::Everyone, off);
            tokio::time::sleep(pause).await;
            let on = acknowledged(shared, || cs.set_sharing(true)).await;
            record(shared, s, viewers, true, true, Scope::Everyone, on);
            off.1.is_some() && on.1.is_some()
        }
        Kind::Unfriend => {
            let off = acknowledged(shared, || cs.remove_friend(idv)).await;
            record(shared, s, vec![v], false, true, Scope::Relation, off);
            // The friend loses sight of `s` only through `s`'s record; `v`'s own record hides
            // `v` from `s` once it carries the change: no promise about `v` here.
            record(shared, v, vec![s], false, false, Scope::Relation, off);
            tokio::time::sleep(pause).await;
            let ask = acknowledged(shared, || cs.add_friend(idv)).await;
            let accept = acknowledged(shared, || cv.add_friend(ids)).await;
            let on = (ask.0, ask.1.and(accept.1));
            record(shared, s, vec![v], true, true, Scope::Relation, on);
            record(shared, v, vec![s], true, false, Scope::Relation, on);
            off.1.is_some() && on.1.is_some()
        }
        Kind::Follower => {
            // Once revoked, `v` may meet `s` as a stranger, as after an unfriending.
            let off = acknowledged(shared, || cs.revoke_follower(idv)).await;
            record(shared, s, vec![v], false, true, Scope::Relation, off);
            tokio::time::sleep(pause).await;
            let on = acknowledged(shared, || cs.allow_follower(idv)).await;
            record(shared, s, vec![v], true, true, Scope::Relation, on);
            off.1.is_some() && on.1.is_some()
        }
    };
    Some(Cycle {
        kind,
        sender: ids,
        viewer: idv,
        restored,
    })
}

/// How many cycles of each kind there were (kinds with none left out).
pub fn by_kind(cycles: &[Cycle]) -> Vec<(Kind, usize)> {
    [Kind::Hide, Kind::SharingOff, Kind::Unfriend, Kind::Follower]
        .into_iter()
        .map(|k| (k, cycles.iter().filter(|c| c.kind == k).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// `(cycles, of them restored)` and the counts by kind, as a report line says them:
/// `298 (hide 80, follower 73; 298 with every request acknowledged)`.
pub fn summary(cycles: (usize, usize), kinds: &[(Kind, usize)]) -> String {
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(k, n)| {
            let name = match k {
                Kind::Hide => "hide",
                Kind::SharingOff => "sharing off",
                Kind::Unfriend => "unfriend",
                Kind::Follower => "follower",
            };
            format!("{name} {n}")
        })
        .collect();
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!("{}; ", kinds.join(", "))
    };
    format!(
        "{} ({kinds}{} with every request acknowledged)",
        cycles.0, cycles.1
    )
}

/// The pairs cycles touched, both ways, as user ids.
pub fn touched(cycles: &[Cycle]) -> BTreeSet<(UserId, UserId)> {
    cycles
        .iter()
        .flat_map(|c| [(c.sender, c.viewer), (c.viewer, c.sender)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::WorldConfig;

    #[test]
    fn grants_churn_one_way_between_online_users_and_are_counted_by_kind() {
        let world = World::generate(WorldConfig {
            users: 2_000,
            mean_degree: 40.0,
            follow_share: 0.2,
            online: 0.5,
            ..WorldConfig::default()
        })
        .expect("world");
        let online = world.online();
        let special = vec![false; online.len()];
        let plan = Plan::new(&world, &special, 1.0, 1);
        assert!(plan.grants() > 0, "no grant between online users");
        for &(s, v) in &plan.grants {
            let (user, follower) = (online[s as usize], online[v as usize]);
            assert!(
                world.follows().contains(&(user, follower)),
                "({user}, {follower}) is not a grant of the world"
            );
        }
        let cycle = |kind| Cycle {
            kind,
            sender: 1,
            viewer: 2,
            restored: true,
        };
        let cycles = [cycle(Kind::Hide), cycle(Kind::Follower), cycle(Kind::Follower)];
        let kinds = by_kind(&cycles);
        assert_eq!(kinds, vec![(Kind::Hide, 1), (Kind::Follower, 2)]);
        assert_eq!(
            summary((3, 2), &kinds),
            "3 (hide 1, follower 2; 2 with every request acknowledged)"
        );
    }
}
