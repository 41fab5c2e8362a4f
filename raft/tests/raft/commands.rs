//! The state machine's determinism and validation, as properties over random command sequences.

use nearby_index::friends::UserRange;
use nearby_index::geo::Millis;
use nearby_raft::state::GroupState;
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
        let ra: Vec<CommandResult> = log.iter().map(|c| a.apply(c)).collect();
        let rb: Vec<CommandResult> = log.iter().map(|c| b.apply(c)).collect();
        prop_assert_eq!(&ra, &rb);
        prop_assert_eq!(&a, &b);
        let bytes = nearby_index::codec::encode(&a).expect("encode");
        let restored: GroupState = nearby_index::codec::decode(&bytes).expect("decode");
        prop_assert_eq!(&restored, &a);
    }

    /// A command that fails validation changes nothing when applied.
    #[test]
    fn rejected_commands_change_nothing(log in proptest::collection::vec(command(), 0..80), extra in command()) {
        let mut s = GroupState::new(group_range());
        for c in &log {
            s.apply(c);
        }
        if extra.validate(&s).is_err() {
            let before = s.clone();
            let r = s.apply(&extra);
            prop_assert!(matches!(r, CommandResult::Rejected(_)));
            prop_assert_eq!(before, s);
        }
    }

    /// Friendship stays symmetric inside the group, and nobody is their own friend.
    #[test]
    fn friendships_stay_symmetric(log in proptest::collection::vec(command(), 0..150)) {
        let mut s = GroupState::new(group_range());
        for c in &log {
            s.apply(c);
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

#[test]
fn validation_names_the_problem() {
    let mut s = GroupState::new(group_range());
    s.apply(&Command::RegisterUser {
        user: 1,
        name: "ann".into(),
    });
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
        s.apply(&Command::RegisterUser {
            user: u,
            name: format!("u{u}"),
        });
    }
    assert_eq!(
        s.apply(&Command::AddFriend { from: 1, to: 2 }),
        CommandResult::FriendRequestSent
    );
    assert!(!s.user(2).expect("2").may_see_me(1, Millis(0)));
    assert_eq!(
        s.apply(&Command::AddFriend { from: 2, to: 1 }),
        CommandResult::FriendshipFormed
    );
    let now = Millis(1_000);
    assert!(s.user(1).expect("1").may_see_me(2, now));
    assert!(!s.user(1).expect("1").may_see_me(3, now), "a stranger sees");
    s.apply(&Command::Hide { user: 1, from: 2 });
    assert!(!s.user(1).expect("1").may_see_me(2, now));
    s.apply(&Command::Unhide { user: 1, from: 2 });
    s.apply(&Command::SetGhost {
        user: 1,
        until: Some(Millis(2_000)),
    });
    assert!(!s.user(1).expect("1").may_see_me(2, now));
    assert!(
        s.user(1).expect("1").may_see_me(2, Millis(2_000)),
        "ghost mode did not end"
    );
    s.apply(&Command::SetSharing { user: 1, on: false });
    assert!(!s.user(1).expect("1").may_see_me(2, Millis(5_000)));
    s.apply(&Command::SetSharing { user: 1, on: true });
    s.apply(&Command::SetGhost { user: 1, until: None });
    s.apply(&Command::GrantFollow { user: 1, follower: 3 });
    assert!(s.user(1).expect("1").may_see_me(3, now));
    assert!(s.user(3).expect("3").following.contains(1));
    assert_eq!(
        s.apply(&Command::RemoveFriend { user: 2, friend: 1 }),
        CommandResult::FriendRemoved
    );
    assert!(!s.user(1).expect("1").may_see_me(2, now));
}
