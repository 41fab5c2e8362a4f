//! The cost of one location update's fan-out decision, on the pure presence engine.
//!
//! A publisher's friends are spread over four shard groups; some are online (subscribed viewers
//! with a live location), a quarter of those within the 8 km radius. One measured iteration is
//! everything the node decides for one update of the publisher: `handle_location` in the home
//! group (store, audience filter against the publisher's own record, split by range, refresh of
//! the publisher's own view) and the delivery of every resulting `GroupMessage::Update` to the
//! destination presences (distance per viewer, entered/moved/left decision, events produced).
//! Not included: pushing the events into the sessions' queues, encoding them, and the network
//! between nodes (on one node, `Output::Send` is a direct call, as here).
//!
//! `cargo bench -p nearby-node --bench fanout -j2 -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nearby_client::proto::Event;
use nearby_index::friends::{RangeTable, UserRange};
use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_node::presence::{Output, Presence, PresenceConfig};
use nearby_raft::shard::command::pair_owner;
use nearby_raft::{Command, CommandResult, GroupId, GroupState};

/// Users per group range: group `g` (1..=4) owns `[g·SPAN, (g+1)·SPAN)`.
const SPAN: u64 = 1_000_000;
const GROUPS: u64 = 4;
/// The publisher, a user of group 1.
const PUBLISHER: UserId = SPAN + 1;
/// Berlin; every other position is an offset from here.
const HOME: (f64, f64) = (52.5200, 13.4050);

fn group_of(u: UserId) -> GroupId {
    u / SPAN
}

/// Four presences and their replicated states, delivering messages to each other directly,
/// like the node's core on one machine.
struct World {
    states: HashMap<GroupId, GroupState>,
    presences: HashMap<GroupId, Presence>,
    now: Millis,
    /// Log index of the last command applied (one counter for all groups is enough here).
    index: u64,
    /// Events produced by the last `drain`.
    events: usize,
    /// Of those, `FriendMoved`.
    moved: usize,
}

impl World {
    fn new() -> World {
        let ranges: Vec<(UserRange, GroupId)> = (1..=GROUPS)
            .map(|g| (UserRange::new(g * SPAN, (g + 1) * SPAN).expect("range"), g))
            .collect();
        let table = Arc::new(RangeTable::new(ranges.clone()).expect("table"));
        let mut w = World {
            states: HashMap::new(),
            presences: HashMap::new(),
            now: Millis(1_764_000_000_000),
            index: 0,
            events: 0,
            moved: 0,
        };
        for (r, g) in ranges {
            w.states.insert(g, GroupState::new(r));
            w.presences.insert(
                g,
                Presence::new(
                    g,
                    nearby_node::incarnation::Incarnation {
                        term: 1,
                        started_ns: 0,
                    },
                    PresenceConfig::default(),
                    Arc::clone(&table),
                ),
            );
        }
        w
    }

    /// Applies `cmd` where the cluster would — a relation in the pair owner's group, whose
    /// intent then reaches the other side — with no live effects (nobody is connected yet).
    fn apply(&mut self, cmd: Command) {
        let target = match cmd.users() {
            (a, Some(b)) if cmd.is_two_sided() => pair_owner(a, b),
            (a, _) => a,
        };
        let g = group_of(target);
        self.index += 1;
        let r = self.states.get_mut(&g).expect("state").apply(&cmd, self.index);
        assert!(!matches!(r, CommandResult::Rejected(_)), "{cmd}: {r}");
        let intents: Vec<_> = self.states[&g].outbox().map(|(seq, m)| (seq, *m)).collect();
        for (seq, mirror) in intents {
            self.index += 1;
            let deliver = Command::Deliver {
                source: g,
                seq,
                mirror,
            };
            let to = group_of(mirror.user);
            let r = self
                .states
                .get_mut(&to)
                .expect("state")
                .apply(&deliver, self.index);
            assert!(!matches!(r, CommandResult::Rejected(_)), "{deliver}: {r}");
            self.index += 1;
            self.states
                .get_mut(&g)
                .expect("state")
                .apply(&Command::Delivered { seq }, self.index);
        }
    }

    /// Delivers the outputs of group `from` until every presence is quiet; counts the events.
    fn drain(&mut self, from: GroupId) {
        let mut queue = self.presences.get_mut(&from).expect("p").poll_outputs();
        self.events = 0;
        self.moved = 0;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for out in queue {
                match out {
                    Output::Push { event, .. } => {
                        self.events += 1;
                        self.moved += usize::from(matches!(event, Event::FriendMoved(_)));
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
        let g = group_of(u);
        let p = self.presences.get_mut(&g).expect("p");
        p.handle_connect(&self.states[&g], u, None);
        self.drain(g);
    }

    /// One location update of `u`, with everything it causes.
    fn locate(&mut self, u: UserId, (lat, lon): (f64, f64)) {
        self.now = Millis(self.now.0 + 1);
        let g = group_of(u);
        let loc = LatLng::new(lat, lon).expect("valid");
        let p = self.presences.get_mut(&g).expect("p");
        assert!(p.handle_location(&self.states[&g], u, loc, self.now, self.now, false));
        self.drain(g);
    }
}

/// A publisher with `friends` friends spread evenly over the four groups, `online` of them
/// connected with a live location, `in_range` of those within 8 km.
fn world(friends: u64, online: u64, in_range: u64) -> World {
    let mut w = World::new();
    w.apply(Command::RegisterUser {
        user: PUBLISHER,
        name: "publisher".into(),
    });
    let ids: Vec<UserId> = (0..friends)
        .map(|i| (i % GROUPS + 1) * SPAN + 10 + i / GROUPS)
        .collect();
    for &f in &ids {
        w.apply(Command::RegisterUser {
            user: f,
            name: format!("friend {f}"),
        });
        w.apply(Command::AddFriend {
            from: PUBLISHER,
            to: f,
        });
        w.apply(Command::AddFriend {
            from: f,
            to: PUBLISHER,
        });
    }
    // The online friends are the first `online` ids: consecutive ids rotate over the groups.
    let viewers = &ids[..online as usize];
    for &v in viewers {
        w.connect(v);
    }
    w.connect(PUBLISHER);
    for (i, &v) in viewers.iter().enumerate() {
        let i = i as u64;
        // In range: 1–7 km north; out of range: 15–75 km north (0.009° of latitude ≈ 1 km).
        let km = if i < in_range {
            1.0 + (i % 7) as f64
        } else {
            15.0 + (i % 61) as f64
        };
        w.locate(v, (HOME.0 + 0.009 * km, HOME.1 + 0.0001 * (i % 10) as f64));
    }
    w.locate(PUBLISHER, HOME);
    // Every in-range viewer now shows the publisher; the next updates are plain moves.
    w.locate(PUBLISHER, (HOME.0, HOME.1 + 0.0005));
    assert_eq!(
        (w.events as u64, w.moved as u64),
        (in_range, in_range),
        "one move event per viewer in range"
    );
    w
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for (name, friends, online, in_range) in [
        ("400_friends_40_online_10_in_range", 400, 40, 10),
        ("5000_friends_400_online_100_in_range", 5_000, 400, 100),
    ] {
        let mut w = world(friends, online, in_range);
        // Per delivered event; the time per iteration is the time per update.
        g.throughput(Throughput::Elements(in_range));
        let mut flip = false;
        g.bench_function(name, |b| {
            b.iter(|| {
                // Alternate between two points 35 m apart: in-range viewers stay in range.
                flip = !flip;
                let lon = if flip { HOME.1 } else { HOME.1 + 0.0005 };
                w.locate(PUBLISHER, (HOME.0, lon));
                black_box(w.events)
            })
        });
        // The viewers in range received moves, never enter/leave churn.
        assert_eq!((w.events as u64, w.moved as u64), (in_range, in_range));
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
