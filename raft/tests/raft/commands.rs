//! The state machine's determinism and validation, as properties over random command sequences.

use nearby_index::friends::UserRange;
use nearby_index::geo::Millis;
use nearby_raft::shard::command::pair_owner;
use nearby_raft::GroupState;
use nearby_raft::{Command, CommandError, CommandResult};
use proptest::prelude::*;

/// The group under test owns users 1..=12; ids up to 16 make some commands cross groups.
fn group_range() -> UserRange {
    UserRange::new(1, 13).expect("range")
}

fn user() -> impl Strategy<Value = u64> {
    0u64..=16
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (user(), "[a-z ]{0,6}").prop_map(|(user, name)| Command::RegisterUser { user, name }),
        (user(), "[a-z]{1,4}").prop_map(|(user, name)| Command::SetName { user, name }),
        (user(), any::<bool>()).prop_map(|(user, on)| Command::SetSharing { user, on }),
        (user(), any::<bool>()).prop_map(|(user, on)| Command::SetDiscoverable { user, on }),
        (user(), proptest::option::of(0u64..1000)).prop_map(|(user, until)| Command::SetGhost {
            user,
            until: until.map(Millis)
        }),
        (user(), user()).prop_map(|(user, from)| Command::Hide { user, from }),
        (user(), user()).prop_map(|(user, from)| Command::Unhide { user, from }),
        (user(), user()).prop_map(|(from, to)| Command::AddFriend { from, to }),
        (user(), user()).prop_map(|(user, friend)| Command::RemoveFriend { user, friend }),
        (user(), user()).prop_map(|(user, follower)| Command::GrantFollow { user, follower }),
        (user(), user()).prop_map(|(user, follower)| Command::RevokeFollow { user, follower }),
        (user(), user()).prop_map(|(follower, user)| Command::Unfollow { follower, user }),
        (user(), any::<bool>()).prop_map(|(user, on)| Command::SetHistory { user, on }),
        (user(), 0u64..1000).prop_map(|(user, t)| Command::DeleteHistory {
            user,
            before: Millis(t)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The same log applied twice gives equal states and equal results, and a snapshot of the
    /// state decodes to the same state.
    #[test]
    fn applying_the_same_log_twice_gives_equal_state(log in proptest::collection::vec(command(), 0..120)) {
        let mut a = GroupState::new(group_range());
        let mut b = GroupState::new(group_range());
        let ra: Vec<CommandResult> = log.iter().enumerate().map(|(i, c)| a.apply(c, i as u64 + 1)).collect();
        let rb: Vec<CommandResult> = log.iter().enumerate().map(|(i, c)| b.apply(c, i as u64 + 1)).collect();
        prop_assert_eq!(&ra, &rb);
        prop_assert_eq!(&a, &b);
        let bytes = a.encode_versioned().expect("encode");
        let restored = GroupState::decode_versioned(&bytes).expect("decode");
        prop_assert_eq!(&restored, &a);
    }

    /// A command that fails validation changes nothing when applied.
    #[test]
    fn rejected_commands_change_nothing(log in proptest::collection::vec(command(), 0..80), extra in command()) {
        let mut s = GroupState::new(group_range());
        for (i, c) in log.iter().enumerate() {
            s.apply(c, i as u64 + 1);
        }
        if extra.validate(&s).is_err() {
            let before = s.clone();
            let r = s.apply(&extra, 10_000);
            prop_assert!(matches!(r, CommandResult::Rejected(_)));
            prop_assert_eq!(before, s);
        }
    }

    /// Friendship stays symmetric inside the group, and nobody is their own friend.
    #[test]
    fn friendships_stay_symmetric(log in proptest::collection::vec(command(), 0..150)) {
        let mut s = GroupState::new(group_range());
        for (i, c) in log.iter().enumerate() {
            s.apply(c, i as u64 + 1);
        }
        for (id, r) in s.users() {
            prop_assert!(!r.friends.contains(id));
            for f in r.friends.iter() {
                if let Some(other) = s.user(f) {
                    prop_assert!(other.friends.contains(id), "{} -> {} is one-sided", id, f);
                }
            }
        }
    }
}

/// Two groups — users 1..=12 and 13..=16 — as the node runs them: a relation command goes to the
/// group of the pair's owner, any other command to the acting user's group; intents are
/// delivered to the other group in order, some of them twice (a retry after a lost answer) and
/// some only later.
struct TwoGroups {
    groups: [GroupState; 2],
    index: [u64; 2],
}

impl TwoGroups {
    fn new() -> Self {
        TwoGroups {
            groups: [
                GroupState::new(group_range()),
                GroupState::new(UserRange::new(13, 17).expect("range")),
            ],
            index: [0, 0],
        }
    }

    fn of(user: u64) -> usize {
        usize::from(user >= 13)
    }

    fn apply(&mut self, g: usize, cmd: &Command) -> CommandResult {
        self.index[g] += 1;
        self.groups[g].apply(cmd, self.index[g])
    }

    /// Delivers the first pending intent of group `g`, `times` times.
    fn deliver_one(&mut self, g: usize, times: usize) {
        let Some((seq, mirror)) = self.groups[g].outbox().next().map(|(s, m)| (s, *m)) else {
            return;
        };
        let deliver = Command::Deliver {
            source: g as u64 + 1,
            seq,
            mirror,
        };
        for _ in 0..times {
            let r = self.apply(1 - g, &deliver);
            assert!(
                !matches!(r, CommandResult::Rejected(_)),
                "{deliver} rejected: {r}"
            );
        }
        self.apply(g, &Command::Delivered { seq });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// However deliveries interleave with new commands, and however often one is repeated, once
    /// every outbox is empty the two groups agree on every cross-group relation.
    #[test]
    fn intents_make_cross_group_relations_symmetric(
        log in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..150),
    ) {
        let mut w = TwoGroups::new();
        for u in 1..=16 {
            w.apply(TwoGroups::of(u), &Command::RegisterUser { user: u, name: format!("u{u}") });
        }
        for (cmd, deliveries, times) in &log {
            let target = match cmd.users() {
                (a, Some(b)) if cmd.is_two_sided() => pair_owner(a, b),
                (a, _) => a,
            };
            w.apply(TwoGroups::of(target), cmd);
            for _ in 0..*deliveries {
                w.deliver_one(0, *times);
                w.deliver_one(1, *times);
            }
        }
        while w.groups.iter().any(|g| g.outbox().next().is_some()) {
            w.deliver_one(0, 1);
            w.deliver_one(1, 1);
        }
        let record = |u: u64| w.groups[TwoGroups::of(u)].user(u).expect("registered").clone();
        for a in 1..=12 {
            for b in 13..=16 {
                let (ra, rb) = (record(a), record(b));
                prop_assert_eq!(ra.friends.contains(b), rb.friends.contains(a), "friends {} {}", a, b);
                prop_assert_eq!(ra.rare().requests_out.contains(b), rb.rare().requests_in.contains(a), "request {} -> {}", a, b);
                prop_assert_eq!(ra.rare().requests_in.contains(b), rb.rare().requests_out.contains(a), "request {} <- {}", a, b);
                prop_assert_eq!(ra.rare().followers.contains(b), rb.rare().following.contains(a), "follow {} -> {}", a, b);
                prop_assert_eq!(ra.rare().following.contains(b), rb.rare().followers.contains(a), "follow {} <- {}", a, b);
            }
        }
    }
}

#[test]
fn validation_names_the_problem() {
    let mut s = GroupState::new(group_range());
    s.apply(
        &Command::RegisterUser {
            user: 1,
            name: "ann".into(),
        },
        1,
    );
    assert_eq!(
        Command::AddFriend { from: 1, to: 1 }.validate(&s),
        Err(CommandError::SelfRelation { user: 1 })
    );
    assert_eq!(
        Command::SetSharing { user: 2, on: true }.validate(&s),
        Err(CommandError::UnknownUser { user: 2 })
    );
    assert!(matches!(
        Command::RegisterUser {
            user: 99,
            name: "x".into()
        }
        .validate(&s),
        Err(CommandError::OutOfRange { .. })
    ));
    assert_eq!(Command::AddFriend { from: 1, to: 99 }.validate(&s), Ok(()));
}

#[test]
fn mutual_requests_form_a_friendship_and_visibility_follows_settings() {
    let mut s = GroupState::new(group_range());
    for u in [1, 2, 3] {
        s.apply(
            &Command::RegisterUser {
                user: u,
                name: format!("u{u}"),
            },
            1,
        );
    }
    assert_eq!(
        s.apply(&Command::AddFriend { from: 1, to: 2 }, 1),
        CommandResult::FriendRequestSent
    );
    assert!(!s.user(2).expect("2").may_see_me(1, Millis(0)));
    assert_eq!(
        s.apply(&Command::AddFriend { from: 2, to: 1 }, 1),
        CommandResult::FriendshipFormed
    );
    let now = Millis(1_000);
    assert!(s.user(1).expect("1").may_see_me(2, now));
    assert!(!s.user(1).expect("1").may_see_me(3, now), "a stranger sees");
    s.apply(&Command::Hide { user: 1, from: 2 }, 1);
    assert!(!s.user(1).expect("1").may_see_me(2, now));
    s.apply(&Command::Unhide { user: 1, from: 2 }, 1);
    s.apply(
        &Command::SetGhost {
            user: 1,
            until: Some(Millis(2_000)),
        },
        1,
    );
    assert!(!s.user(1).expect("1").may_see_me(2, now));
    assert!(
        s.user(1).expect("1").may_see_me(2, Millis(2_000)),
        "ghost mode did not end"
    );
    s.apply(&Command::SetSharing { user: 1, on: false }, 1);
    assert!(!s.user(1).expect("1").may_see_me(2, Millis(5_000)));
    s.apply(&Command::SetSharing { user: 1, on: true }, 1);
    s.apply(&Command::SetGhost { user: 1, until: None }, 1);
    s.apply(&Command::GrantFollow { user: 1, follower: 3 }, 1);
    assert!(s.user(1).expect("1").may_see_me(3, now));
    assert!(s.user(3).expect("3").rare().following.contains(1));
    assert_eq!(
        s.apply(&Command::RemoveFriend { user: 2, friend: 1 }, 1),
        CommandResult::FriendRemoved
    );
    assert!(!s.user(1).expect("1").may_see_me(2, now));
}

/// A snapshot written before user records had history settings (the first layout) still
/// restores: every relation and setting kept, history on and never deleted.
#[test]
fn a_snapshot_of_the_first_layout_restores_with_history_defaults() {
    use nearby_index::friends::FriendSet;
    use std::collections::BTreeMap;

    #[derive(serde::Serialize)]
    struct UserRecordV1 {
        name: String,
        sharing: bool,
        discoverable: bool,
        ghost_until: Option<Millis>,
        hidden_from: FriendSet,
        friends: FriendSet,
        requests_in: FriendSet,
        requests_out: FriendSet,
        followers: FriendSet,
        following: FriendSet,
    }
    #[derive(serde::Serialize)]
    struct GroupStateV1 {
        range: UserRange,
        users: BTreeMap<u64, UserRecordV1>,
        outbox: BTreeMap<u64, nearby_raft::shard::command::Mirror>,
        inbox: BTreeMap<u64, u64>,
    }
    let set = |ids: &[u64]| ids.iter().copied().collect::<FriendSet>();
    let old = GroupStateV1 {
        range: group_range(),
        users: BTreeMap::from([(
            3,
            UserRecordV1 {
                name: "Ann".into(),
                sharing: false,
                discoverable: true,
                ghost_until: Some(Millis(77)),
                hidden_from: set(&[4]),
                friends: set(&[4, 5]),
                requests_in: set(&[6]),
                requests_out: set(&[7]),
                followers: set(&[8]),
                following: set(&[9]),
            },
        )]),
        outbox: BTreeMap::new(),
        inbox: BTreeMap::from([(2, 11)]),
    };
    let bytes = nearby_index::codec::encode(&old).expect("encode");
    let s = GroupState::decode_versioned(&bytes).expect("the first layout decodes");
    let r = s.user(3).expect("ann");
    assert_eq!(&*r.name, "Ann");
    assert!(!r.sharing && r.discoverable);
    assert_eq!(r.ghost_until(), Some(Millis(77)));
    assert_eq!(r.friends, set(&[4, 5]));
    assert_eq!(
        (r.rare().requests_in.clone(), r.rare().requests_out.clone()),
        (set(&[6]), set(&[7]))
    );
    assert_eq!(
        (r.rare().followers.clone(), r.rare().following.clone()),
        (set(&[8]), set(&[9]))
    );
    assert!(r.rare().hidden_from.contains(4));
    assert!(!r.history_off && r.history_cleared().is_none());
    assert_eq!(s.delivered_from(2), 11);
    // Written again, it is the current layout, and a layout from the future is refused.
    let again = s.encode_versioned().expect("encode");
    assert_eq!(again[..2], [0xff, 3]);
    assert_eq!(GroupState::decode_versioned(&again).expect("decode"), s);
    let mut future = again.clone();
    future[1] = 4;
    assert!(GroupState::decode_versioned(&future).is_err());
    // The second layout (before splits and merges) reads too.
    #[derive(serde::Serialize)]
    struct GroupStateV2<'a> {
        range: UserRange,
        users: BTreeMap<u64, &'a nearby_raft::UserRecord>,
        outbox: BTreeMap<u64, nearby_raft::shard::command::Mirror>,
        inbox: BTreeMap<u64, u64>,
    }
    let v2 = GroupStateV2 {
        range: s.range(),
        users: s.users().collect(),
        outbox: BTreeMap::new(),
        inbox: BTreeMap::from([(2, 11)]),
    };
    let mut bytes = vec![0xff, 2];
    bytes.extend(nearby_index::codec::encode(&v2).expect("encode"));
    assert_eq!(
        GroupState::decode_versioned(&bytes).expect("the second layout decodes"),
        s
    );
}

/// A record keeps what most users never set out of line, but encodes every field inline, in the
/// order it always had: snapshots, intents and peer messages read and write the same bytes. Once
/// its rare fields are all empty again they are freed, and the record equals one that never
/// had them.
#[test]
fn a_record_encodes_inline_and_frees_its_rare_fields_once_empty() {
    use nearby_index::friends::FriendSet;
    use nearby_raft::UserRecord;

    #[derive(serde::Serialize)]
    struct Inline {
        name: String,
        sharing: bool,
        discoverable: bool,
        ghost_until: Option<Millis>,
        hidden_from: FriendSet,
        friends: FriendSet,
        requests_in: FriendSet,
        requests_out: FriendSet,
        followers: FriendSet,
        following: FriendSet,
        history_off: bool,
        history_cleared: Option<Millis>,
    }
    let set = |ids: &[u64]| ids.iter().copied().collect::<FriendSet>();
    let full = Inline {
        name: "Ann".into(),
        sharing: false,
        discoverable: true,
        ghost_until: Some(Millis(77)),
        hidden_from: set(&[4]),
        friends: set(&[4, 5, u64::MAX - 1]),
        requests_in: set(&[6]),
        requests_out: set(&[7]),
        followers: set(&[8]),
        following: set(&[9]),
        history_off: true,
        history_cleared: Some(Millis(5)),
    };
    // A name, three flags, a friend set and one pointer (160 B when every field was inline).
    assert!(
        std::mem::size_of::<UserRecord>() <= 56,
        "{}",
        std::mem::size_of::<UserRecord>()
    );
    let bytes = nearby_index::codec::encode(&full).expect("encode");
    let mut r: UserRecord = nearby_index::codec::decode(&bytes).expect("decode");
    assert_eq!(r.ghost_until(), Some(Millis(77)));
    assert_eq!(r.history_cleared(), Some(Millis(5)));
    assert_eq!(r.rare().following, set(&[9]));
    assert_eq!(nearby_index::codec::encode(&r).expect("encode"), bytes);
    assert!(r.rare_if_set().is_some());

    let plain = Inline {
        ghost_until: None,
        hidden_from: set(&[]),
        requests_in: set(&[]),
        requests_out: set(&[]),
        followers: set(&[]),
        following: set(&[]),
        history_cleared: None,
        ..full
    };
    let bytes = nearby_index::codec::encode(&plain).expect("encode");
    let mut r: UserRecord = nearby_index::codec::decode(&bytes).expect("decode");
    assert!(
        r.rare_if_set().is_none(),
        "nothing rare is set: nothing held out of line"
    );
    assert_eq!(nearby_index::codec::encode(&r).expect("encode"), bytes);

    // Through commands: a hide and a follower grant, then their undoing, free the rare fields.
    let mut s = GroupState::new(group_range());
    s.apply(
        &Command::RegisterUser {
            user: 1,
            name: "a".into(),
        },
        1,
    );
    let fresh = s.user(1).expect("1").clone();
    s.apply(&Command::Hide { user: 1, from: 2 }, 2);
    s.apply(&Command::GrantFollow { user: 1, follower: 3 }, 3);
    let mut held = s.user(1).expect("1").clone();
    assert!(held.rare_if_set().is_some() && held != fresh);
    s.apply(&Command::Unhide { user: 1, from: 2 }, 4);
    s.apply(&Command::RevokeFollow { user: 1, follower: 3 }, 5);
    let mut back = s.user(1).expect("1").clone();
    assert!(back.rare_if_set().is_none(), "emptied rare fields are freed");
    assert_eq!(back, fresh);
}

/// Groups as the node runs them, by id: commands and intents routed by range, as the map
/// routes them (a group that split is found by its new range from then on).
struct Groups {
    groups: Vec<(u64, GroupState, u64)>,
}

impl Groups {
    /// Groups 1, 2, … owning `ranges`, with `users` registered.
    fn with_users(ranges: &[(u64, u64)], users: impl IntoIterator<Item = u64>) -> Self {
        let mut w = Groups {
            groups: ranges
                .iter()
                .enumerate()
                .map(|(i, (a, b))| {
                    (
                        i as u64 + 1,
                        GroupState::new(UserRange::new(*a, *b).expect("range")),
                        0,
                    )
                })
                .collect(),
        };
        for u in users {
            let g = w.of(u);
            w.apply(
                g,
                &Command::RegisterUser {
                    user: u,
                    name: format!("u{u}"),
                },
            );
        }
        w
    }

    fn of(&self, user: u64) -> usize {
        self.find(user).expect("every user has a group")
    }

    fn find(&self, user: u64) -> Option<usize> {
        self.groups.iter().position(|(_, s, _)| s.range().contains(user))
    }

    fn apply(&mut self, g: usize, cmd: &Command) -> CommandResult {
        let (_, state, index) = &mut self.groups[g];
        *index += 1;
        state.apply(cmd, *index)
    }

    /// Delivers, as the node's outbox does, the first pending intent of group `g` for each
    /// destination group (in order per destination, independently of the others), `times`
    /// times each, where the map says its user lives.
    fn deliver_one(&mut self, g: usize, times: usize) {
        let source = self.groups[g].0;
        let mut firsts: Vec<(usize, u64, nearby_raft::shard::command::Mirror)> = Vec::new();
        for (seq, m) in self.groups[g].1.outbox() {
            let dest = self.of(m.user);
            if firsts.iter().all(|(d, _, _)| *d != dest) {
                firsts.push((dest, seq, *m));
            }
        }
        'next: for (dest, seq, mirror) in firsts {
            let deliver = Command::Deliver { source, seq, mirror };
            for _ in 0..times {
                match self.apply(dest, &deliver) {
                    // A frozen group (being merged) refuses: the intent waits for the map.
                    CommandResult::Rejected(CommandError::OutOfRange { .. })
                        if self.groups[dest].1.frozen().is_some() =>
                    {
                        continue 'next;
                    }
                    r => assert!(
                        !matches!(r, CommandResult::Rejected(_)),
                        "{deliver} rejected: {r}"
                    ),
                }
            }
            self.apply(g, &Command::Delivered { seq });
        }
    }

    /// Merges group `right` into its left neighbour `left`, as the node does: `right` frozen,
    /// its outbox delivered, its records absorbed in chunks, then its range; the map then
    /// routes its users to `left`.
    fn merge(&mut self, left: usize, right: usize) {
        let into = self.groups[left].0;
        let source = self.groups[right].0;
        assert_eq!(
            self.apply(right, &Command::Freeze { into }),
            CommandResult::Updated
        );
        let refused = self.apply(
            right,
            &Command::SetSharing {
                user: self.groups[right].1.range().start,
                on: false,
            },
        );
        assert!(
            matches!(refused, CommandResult::Rejected(CommandError::OutOfRange { .. })),
            "{refused}"
        );
        while self.groups[right].1.outbox().next().is_some() {
            self.deliver_one(right, 1);
        }
        let users: Vec<(u64, nearby_raft::UserRecord)> = self.groups[right]
            .1
            .users()
            .map(|(u, r)| (u, r.clone()))
            .collect();
        for chunk in users.chunks(2) {
            let r = self.apply(
                left,
                &Command::AbsorbUsers {
                    source,
                    users: chunk.to_vec(),
                },
            );
            assert_eq!(r, CommandResult::Updated);
        }
        let range = self.groups[right].1.range();
        let inbox = (1..=8)
            .map(|g| (g, self.groups[right].1.delivered_from(g)))
            .filter(|(_, s)| *s > 0)
            .collect();
        let r = self.apply(left, &Command::AbsorbDone { source, range, inbox });
        assert_eq!(r, CommandResult::Updated);
        self.groups.remove(right);
    }

    /// Applies `log` as the node routes it (a relation command to its pair owner's group,
    /// anything else to the acting user's; an id no group owns is refused before any group
    /// sees it), with the given deliveries after each command.
    fn run(&mut self, log: &[(Command, usize, usize)]) {
        for (cmd, deliveries, times) in log {
            let target = match cmd.users() {
                (a, Some(b)) if cmd.is_two_sided() => pair_owner(a, b),
                (a, _) => a,
            };
            if let Some(g) = self.find(target) {
                self.apply(g, cmd);
            }
            for _ in 0..*deliveries {
                for g in 0..self.groups.len() {
                    self.deliver_one(g, *times);
                }
            }
        }
    }

    /// Delivers every pending intent, in rounds, until no outbox holds one.
    fn settle(&mut self) {
        while self.groups.iter().any(|(_, g, _)| g.outbox().next().is_some()) {
            for g in 0..self.groups.len() {
                self.deliver_one(g, 1);
            }
        }
    }

    /// The first pair of users 1..=16 whose two sides disagree about a relation, if any.
    fn asymmetric(&self) -> Option<String> {
        let record = |u: u64| self.groups[self.of(u)].1.user(u).expect("registered").clone();
        for a in 1..=16 {
            for b in (1..=16).filter(|b| *b != a) {
                let (ra, rb) = (record(a), record(b));
                if ra.friends.contains(b) != rb.friends.contains(a) {
                    return Some(format!("friends {a} {b}"));
                }
                if ra.rare().requests_out.contains(b) != rb.rare().requests_in.contains(a) {
                    return Some(format!("request {a} -> {b}"));
                }
                if ra.rare().followers.contains(b) != rb.rare().following.contains(a) {
                    return Some(format!("follow {a} -> {b}"));
                }
            }
        }
        None
    }

    /// Splits group `g` at `at` into a new group, as the node does: the parent's log entry,
    /// then the new group made from the seed, then the parent drops the seed.
    fn split(&mut self, g: usize, at: u64) {
        let new_group = self.groups.iter().map(|(id, _, _)| *id).max().unwrap_or(0) + 1;
        let r = self.apply(
            g,
            &Command::Split {
                at,
                new_group,
                voters: vec![1],
            },
        );
        assert!(matches!(r, CommandResult::Split { .. }), "{r}");
        let seed = self.groups[g].1.split_seed().expect("a seed").clone();
        let refused = self.apply(
            g,
            &Command::Split {
                at: at + 1,
                new_group: new_group + 1,
                voters: vec![1],
            },
        );
        assert_eq!(refused, CommandResult::Rejected(CommandError::Splitting));
        let child = seed.group_state();
        self.groups.push((new_group, child, 0));
        self.apply(g, &Command::SplitDone);
        assert!(self.groups[g].1.split_seed().is_none());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A split in the middle of a run — intents pending, delivered twice, delivered late —
    /// leaves every relation symmetric once every outbox is empty: no friendship is lost or
    /// made up by moving a range.
    #[test]
    fn a_split_in_the_middle_keeps_relations_symmetric(
        before in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..80),
        after in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..80),
        at in 2u64..=12,
    ) {
        let mut w = Groups::with_users(&[(1, 13), (13, 17)], 1..=16);
        w.run(&before);
        w.split(0, at);
        prop_assert_eq!(w.groups[0].1.range(), UserRange::new(1, at).expect("kept"));
        prop_assert!((at..=12).all(|u| w.groups[2].1.user(u).is_some()), "every user went with the split");
        prop_assert!((1..at).all(|u| w.groups[0].1.user(u).is_some() && w.groups[2].1.user(u).is_none()));
        w.run(&after);
        w.settle();
        prop_assert_eq!(w.asymmetric(), None);
    }
}

/// The case: a user with 5,000 friends — some staying in the old group, some moving
/// with it, some in another group — is split off. Its record moves whole, every other record is
/// what it was, and nothing is sent between groups: no friendship is moved or rewritten.
#[test]
fn a_user_with_5000_friends_moves_whole_in_a_split_and_no_friendship_is_rewritten() {
    const HUB: u64 = 10_000;
    let stay = 1..=1_250u64;
    let go = HUB + 1..=HUB + 1_250;
    let other = 20_000..=22_499u64;
    let friends: Vec<u64> = stay.clone().chain(go.clone()).chain(other.clone()).collect();
    assert_eq!(friends.len(), 5_000);
    let mut w = Groups::with_users(
        &[(1, 20_000), (20_000, 40_000)],
        std::iter::once(HUB).chain(friends.iter().copied()),
    );
    let log: Vec<(Command, usize, usize)> = friends
        .iter()
        .flat_map(|&f| {
            [
                (Command::AddFriend { from: HUB, to: f }, 0, 1),
                (Command::AddFriend { from: f, to: HUB }, 0, 1),
            ]
        })
        .collect();
    w.run(&log);
    w.settle();
    let records = |w: &Groups| -> std::collections::BTreeMap<u64, nearby_raft::UserRecord> {
        w.groups
            .iter()
            .flat_map(|(_, s, _)| {
                s.users()
                    .filter(|(u, _)| s.range().contains(*u))
                    .map(|(u, r)| (u, r.clone()))
            })
            .collect()
    };
    let before = records(&w);
    assert_eq!(before[&HUB].friends.len(), 5_000);

    w.split(0, HUB);
    let after = records(&w);
    assert_eq!(
        after, before,
        "every record, the hub's 5,000 friendships included, is what it was"
    );
    let new = &w.groups[2].1;
    assert_eq!(new.range(), UserRange::new(HUB, 20_000).expect("range"));
    assert!(new.user(HUB).is_some() && go.clone().all(|u| new.user(u).is_some()));
    assert!(
        w.groups[0].1.user(HUB).is_none(),
        "the old group dropped what it handed over"
    );
    for (id, s, _) in &w.groups {
        assert_eq!(
            s.outbox().count(),
            0,
            "group {id} sent intents: a friendship was rewritten"
        );
    }
    // And the hub's friendships still work from the new group: one ends, on both sides.
    let f = *go.start();
    w.run(&[(
        Command::RemoveFriend {
            user: HUB,
            friend: *other.start(),
        },
        0,
        1,
    )]);
    w.settle();
    let after = records(&w);
    assert_eq!(after[&HUB].friends.len(), 4_999);
    assert!(!after[other.start()].friends.contains(HUB));
    assert!(after[&f].friends.contains(HUB));
}

#[test]
fn a_split_refuses_a_point_outside_the_range_and_commands_for_what_it_handed_over() {
    let mut s = GroupState::new(group_range());
    for u in [3, 9] {
        s.apply(
            &Command::RegisterUser {
                user: u,
                name: format!("u{u}"),
            },
            u,
        );
    }
    for at in [1, 13, 40] {
        let r = s.apply(
            &Command::Split {
                at,
                new_group: 5,
                voters: vec![1],
            },
            20,
        );
        assert!(
            matches!(r, CommandResult::Rejected(CommandError::OutOfRange { .. })),
            "{at}: {r}"
        );
    }
    assert_eq!(
        s.apply(
            &Command::Split {
                at: 6,
                new_group: 5,
                voters: vec![1, 2]
            },
            21
        ),
        CommandResult::Split { users: 1 }
    );
    // The handed-over user is still readable (its sessions are served until they move), but
    // every change to it is refused here.
    assert!(s.user(9).is_some());
    let r = s.apply(&Command::SetSharing { user: 9, on: false }, 22);
    assert!(
        matches!(r, CommandResult::Rejected(CommandError::OutOfRange { .. })),
        "{r}"
    );
    assert!(s.user(9).is_some_and(|r| r.sharing));
    // The seed survives a snapshot (layout 3) and makes the new group's state.
    let back = GroupState::decode_versioned(&s.encode_versioned().expect("encode")).expect("decode");
    assert_eq!(back, s);
    let child = s.split_seed().expect("seed").group_state();
    assert_eq!(child.range(), UserRange::new(6, 13).expect("range"));
    assert_eq!(child.seq_base(), 21);
    assert!(child.user(9).is_some() && child.user(3).is_none());
    s.apply(&Command::SplitDone, 23);
    assert!(s.user(9).is_none() && s.split_seed().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A merge in the middle of a run (and a split of the merged group after it) leaves every
    /// relation symmetric once every outbox is empty: intents the absorbed group had applied
    /// are not applied again, and none is lost.
    #[test]
    fn a_merge_in_the_middle_keeps_relations_symmetric(
        before in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..60),
        middle in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..60),
        after in proptest::collection::vec((command(), 0usize..3, 1usize..3), 0..60),
        at in 2u64..=15,
        upper in any::<bool>(),
    ) {
        let mut w = Groups::with_users(&[(1, 7), (7, 13), (13, 17)], 1..=16);
        w.run(&before);
        // The upper pair (7..13 and 13..17) has a source below it that delivers to both.
        let (left, joined) = if upper { (1, UserRange::new(7, 17)) } else { (0, UserRange::new(1, 13)) };
        let joined = joined.expect("joined");
        w.merge(left, left + 1);
        prop_assert_eq!(w.groups[left].1.range(), joined);
        prop_assert!((joined.start..joined.end).all(|u| w.groups[left].1.user(u).is_some()));
        w.run(&middle);
        let g = w.of(at);
        if w.groups[g].1.range().start < at {
            w.split(g, at);
        }
        w.run(&after);
        w.settle();
        prop_assert_eq!(w.asymmetric(), None);
    }
}

#[test]
fn an_intent_for_an_absorbed_range_is_applied_even_behind_the_absorbers_own_order() {
    let mut w = Groups::with_users(&[(1, 7), (7, 13), (13, 17)], [1, 8, 14]);
    // User 1 asks 14 (an intent for group 3), then 8 (an intent for group 2).
    w.apply(0, &Command::AddFriend { from: 1, to: 14 });
    w.apply(0, &Command::AddFriend { from: 1, to: 8 });
    let intents: Vec<(u64, nearby_raft::shard::command::Mirror)> =
        w.groups[0].1.outbox().map(|(s, m)| (s, *m)).collect();
    let (to_14, to_8) = (intents[0], intents[1]);
    assert!(to_14.0 < to_8.0);
    // Group 2 hears of its intent first (the outbox goes in order per destination only).
    let r = w.apply(
        1,
        &Command::Deliver {
            source: 1,
            seq: to_8.0,
            mirror: to_8.1,
        },
    );
    assert_eq!(r, CommandResult::Updated);
    // Group 3 merges into group 2 before its own intent arrived.
    w.merge(1, 2);
    let r = w.apply(
        1,
        &Command::Deliver {
            source: 1,
            seq: to_14.0,
            mirror: to_14.1,
        },
    );
    assert_eq!(
        r,
        CommandResult::Updated,
        "the earlier intent is new for the absorbed range"
    );
    assert!(w.groups[1]
        .1
        .user(14)
        .is_some_and(|r| r.rare().requests_in.contains(1)));
    // And delivered again, it changes nothing.
    let r = w.apply(
        1,
        &Command::Deliver {
            source: 1,
            seq: to_14.0,
            mirror: to_14.1,
        },
    );
    assert_eq!(r, CommandResult::Unchanged);
}

#[test]
fn relations_past_the_limit_are_refused_when_proposed_but_answering_a_request_is_not() {
    use nearby_raft::shard::command::MAX_RELATIONS;
    let n = MAX_RELATIONS as u64;
    let mut s = GroupState::new(UserRange::new(1, 100_000).expect("range"));
    let (hub, victim, late) = (1, 50_000, 60_000);
    for u in (1..=n + 2).chain([victim, late]) {
        s.apply(
            &Command::RegisterUser {
                user: u,
                name: format!("u{u}"),
            },
            0,
        );
    }
    for f in 2..=n + 1 {
        s.apply(&Command::AddFriend { from: hub, to: f }, 0);
        s.apply(&Command::AddFriend { from: f, to: victim }, 0);
    }
    // The hub's friend requests sent reached the limit: one more is refused.
    let more = Command::AddFriend { from: hub, to: n + 2 };
    assert!(matches!(
        more.check_limits(&s),
        Err(CommandError::TooManyRelations { user: 1, .. })
    ));
    // Answering a request the hub received still passes: it was counted when it came.
    s.apply(&Command::AddFriend { from: late, to: hub }, 0);
    assert_eq!(
        Command::AddFriend { from: hub, to: late }.check_limits(&s),
        Ok(())
    );
    // The victim has as many requests waiting as a user may: a new asker is refused.
    assert!(matches!(
        Command::AddFriend {
            from: late,
            to: victim
        }
        .check_limits(&s),
        Err(CommandError::TooManyRelations { user: 50_000, .. })
    ));
    // Below the limits nothing is in the way.
    assert_eq!(
        Command::AddFriend {
            from: late,
            to: n + 2
        }
        .check_limits(&s),
        Ok(())
    );
    assert_eq!(
        Command::GrantFollow {
            user: late,
            follower: hub
        }
        .check_limits(&s),
        Ok(())
    );
}
