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
                prop_assert_eq!(ra.requests_out.contains(b), rb.requests_in.contains(a), "request {} -> {}", a, b);
                prop_assert_eq!(ra.requests_in.contains(b), rb.requests_out.contains(a), "request {} <- {}", a, b);
                prop_assert_eq!(ra.followers.contains(b), rb.following.contains(a), "follow {} -> {}", a, b);
                prop_assert_eq!(ra.following.contains(b), rb.followers.contains(a), "follow {} <- {}", a, b);
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
    assert!(s.user(3).expect("3").following.contains(1));
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
    assert_eq!(r.name, "Ann");
    assert!(!r.sharing && r.discoverable);
    assert_eq!(r.ghost_until, Some(Millis(77)));
    assert_eq!(r.friends, set(&[4, 5]));
    assert_eq!(
        (r.requests_in.clone(), r.requests_out.clone()),
        (set(&[6]), set(&[7]))
    );
    assert_eq!((r.followers.clone(), r.following.clone()), (set(&[8]), set(&[9])));
    assert!(r.hidden_from.contains(4));
    assert!(!r.history_off && r.history_cleared.is_none());
    assert_eq!(s.delivered_from(2), 11);
    // Written again, it is the current layout, and a layout from the future is refused.
    let again = s.encode_versioned().expect("encode");
    assert_eq!(again[..2], [0xff, 2]);
    assert_eq!(GroupState::decode_versioned(&again).expect("decode"), s);
    let mut future = again.clone();
    future[1] = 3;
    assert!(GroupState::decode_versioned(&future).is_err());
}
