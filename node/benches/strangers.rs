//! Strangers nearby in a crowded city, on the pure presence engine: 10,000 discoverable users in
//! Berlin (a 20 × 22 km box) over eight shard groups, and 100 of their neighbours listening.
//!
//! - `publish`: one discoverable user's location update and everything it causes — the home
//!   group's publication to the cell's channel group, the channel's relay to every listener
//!   group of the cell, each listener group's update of the pages it shows (events produced).
//! - `page`: one listener's `ListStrangers` page of 20, nearest first, with the count of the rest
//!   (every stranger in the cells covering 8 km is a candidate).
//!
//! Not included, as in `fanout`: sessions' queues, encoding, the network between nodes.
//!
//! `cargo bench -p nearby-node --bench strangers -j2 -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nearby_index::friends::RangeTable;
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_node::presence::{Output, Presence, PresenceConfig};
use nearby_node::strangers::Pseudonyms;
use nearby_raft::{Command, GroupId, GroupState};

const GROUPS: u64 = 8;
const CITY: u64 = 10_000;
const LISTENERS: u64 = 100;
/// Berlin; every position is an offset from here.
const HOME: (f64, f64) = (52.5200, 13.4050);

struct World {
    ranges: Arc<RangeTable<GroupId>>,
    states: HashMap<GroupId, GroupState>,
    presences: HashMap<GroupId, Presence>,
    now: Millis,
    index: u64,
    events: usize,
}

/// A deterministic spread of `i` over the box (a low-discrepancy walk, no RNG needed).
fn spot(i: u64) -> (f64, f64) {
    let a = (i as f64 * 0.618_033_988_75).fract();
    let b = (i as f64 * 0.754_877_666_25).fract();
    (HOME.0 - 0.09 + 0.18 * a, HOME.1 - 0.16 + 0.32 * b)
}

impl World {
    fn new() -> World {
        let ranges = Arc::new(
            RangeTable::new(
                nearby_raft::meta::initial_ranges(GROUPS)
                    .into_iter()
                    .map(|(g, r)| (r, g))
                    .collect(),
            )
            .expect("ranges"),
        );
        let config = PresenceConfig {
            pseudonyms: Some(Pseudonyms::new(b"bench cluster key")),
            ..PresenceConfig::default()
        };
        let mut w = World {
            ranges: Arc::clone(&ranges),
            states: HashMap::new(),
            presences: HashMap::new(),
            now: Millis(1_764_000_000_000),
            index: 0,
            events: 0,
        };
        for &(r, g) in ranges.ranges() {
            w.states.insert(g, GroupState::new(r));
            w.presences.insert(
                g,
                Presence::new(
                    g,
                    nearby_node::incarnation::Incarnation {
                        term: 1,
                        started_ns: 0,
                    },
                    config.clone(),
                    Arc::clone(&ranges),
                ),
            );
        }
        w
    }

    fn group_of(&self, u: UserId) -> GroupId {
        *self.ranges.locate(u).expect("routed")
    }

    /// User `i`, spread over the id space (and so over the groups).
    fn user(i: u64) -> UserId {
        1 + i * (u64::MAX / (2 * CITY + 2 * LISTENERS + 2))
    }

    fn apply(&mut self, cmd: Command) {
        let g = self.group_of(cmd.users().0);
        self.index += 1;
        self.states.get_mut(&g).expect("state").apply(&cmd, self.index);
    }

    fn drain(&mut self, from: GroupId) {
        let mut queue = self.presences.get_mut(&from).expect("p").poll_outputs();
        self.events = 0;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for out in queue {
                match out {
                    Output::Push { event, .. } => {
                        self.events += 1;
                        black_box(event);
                    }
                    Output::Purge { .. } => {}
                    Output::Send { to, msg } => {
                        let p = self.presences.get_mut(&to).expect("p");
                        p.handle_message(&self.states[&to], msg, self.now);
                        next.extend(p.poll_outputs());
                    }
                }
            }
            queue = next;
        }
    }

    fn connect(&mut self, u: UserId) {
        let g = self.group_of(u);
        let p = self.presences.get_mut(&g).expect("p");
        p.handle_connect(&self.states[&g], u, None);
        self.drain(g);
    }

    fn locate(&mut self, u: UserId, (lat, lon): (f64, f64)) {
        self.now = Millis(self.now.0 + 1);
        let g = self.group_of(u);
        let loc = LatLng::new(lat, lon).expect("valid");
        let p = self.presences.get_mut(&g).expect("p");
        assert!(p.handle_location(&self.states[&g], u, loc, self.now, self.now, false));
        self.drain(g);
    }

    fn listen(&mut self, u: UserId) {
        let g = self.group_of(u);
        let p = self.presences.get_mut(&g).expect("p");
        assert!(p.listen_strangers(&self.states[&g], u, 20));
        self.drain(g);
    }
}

fn city() -> World {
    let mut w = World::new();
    for i in 0..CITY + LISTENERS {
        let user = World::user(i);
        w.apply(Command::RegisterUser {
            user,
            name: format!("user {i}"),
        });
    }
    for i in 0..CITY {
        let user = World::user(i);
        w.apply(Command::SetDiscoverable { user, on: true });
        w.locate(user, spot(i));
    }
    for i in CITY..CITY + LISTENERS {
        let user = World::user(i);
        w.connect(user);
        w.locate(user, spot(i));
        w.listen(user);
    }
    w
}

fn bench(c: &mut Criterion) {
    let mut w = city();
    let listener = World::user(CITY);
    let g = w.group_of(listener);
    let (page, more) = w.presences[&g].strangers_page(&w.states[&g], listener, 20);
    assert_eq!(page.len(), 20, "a listener sees a full page");
    assert!(more > 1_000, "{more} more strangers in range");

    let mut group = c.benchmark_group("strangers");
    group.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    group.bench_function("publish/10k-city/100-listeners", |b| {
        b.iter(|| {
            i = (i + 1) % CITY;
            let (lat, lon) = spot(i);
            w.locate(World::user(i), (lat + 0.000_01, lon));
            black_box(w.events)
        })
    });
    group.bench_function("page/10k-city", |b| {
        b.iter(|| black_box(w.presences[&g].strangers_page(&w.states[&g], listener, 20)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
