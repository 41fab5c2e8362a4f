//! The bulk-import file: users and relations to load into a fresh cluster in large batches
//! (the load simulator writes its world this way; `nearby-node dev --import FILE` reads it).
//!
//! The file is one [`Seed`] encoded with `nearby_index::codec`. [`Seed::batches_for`] cuts it
//! into [`ImportBatch`]es for one group: only the users and relations with a side in the group's
//! range, at most [`IMPORT_BATCH_ITEMS`] items each, so every batch is one modest log entry.
//! (Entries travel to followers up to 64 at a time: entries of a few tens of KiB keep one
//! append small enough for a new replica to catch up while the import is still running.)

use std::path::Path;

use nearby_index::friends::UserRange;
use nearby_index::geo::UserId;
use serde::{Deserialize, Serialize};

use crate::error::WalError;
use crate::shard::command::{ImportBatch, MAX_IMPORT_ITEMS};

/// How many users plus relations [`Seed::batches_for`] puts in one batch: ~20 KiB encoded.
/// [`MAX_IMPORT_ITEMS`] stays the limit a replica accepts, so logs written with larger batches
/// still replay.
pub const IMPORT_BATCH_ITEMS: usize = 1_000;
const _: () = assert!(IMPORT_BATCH_ITEMS <= MAX_IMPORT_ITEMS);

/// Users and relations to import.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    /// Users with display names.
    pub users: Vec<(UserId, String)>,
    /// Mutual friendships, each pair once.
    pub friendships: Vec<(UserId, UserId)>,
    /// One-way grants `(user, follower)`.
    pub follows: Vec<(UserId, UserId)>,
}

impl Seed {
    /// Writes the seed to `path`.
    pub fn write(&self, path: &Path) -> Result<(), WalError> {
        let bytes = nearby_index::codec::encode(self).map_err(|e| WalError::Encode(e.to_string()))?;
        std::fs::write(path, bytes).map_err(|e| WalError::io(path, e))
    }

    /// Reads a seed written by [`Seed::write`].
    pub fn read(path: &Path) -> Result<Seed, WalError> {
        let bytes = std::fs::read(path).map_err(|e| WalError::io(path, e))?;
        nearby_index::codec::decode(&bytes)
            .map_err(|e| WalError::corruption(path, 0, format!("not a seed file: {e}")))
    }

    /// The batches for the group owning `range`, users first (relations need their users).
    pub fn batches_for(&self, range: UserRange) -> Vec<ImportBatch> {
        let mut out = Vec::new();
        let mut cur = ImportBatch::default();
        let flush = |cur: &mut ImportBatch, out: &mut Vec<ImportBatch>| {
            if cur.len() >= IMPORT_BATCH_ITEMS {
                out.push(std::mem::take(cur));
            }
        };
        for u in self.users.iter().filter(|(id, _)| range.contains(*id)) {
            cur.users.push(u.clone());
            flush(&mut cur, &mut out);
        }
        // Users go in earlier entries than the relations that need them.
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        let here = |(a, b): &(UserId, UserId)| range.contains(*a) || range.contains(*b);
        for f in self.friendships.iter().filter(|p| here(p)) {
            cur.friendships.push(*f);
            flush(&mut cur, &mut out);
        }
        for f in self.follows.iter().filter(|p| here(p)) {
            cur.follows.push(*f);
            flush(&mut cur, &mut out);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::state::GroupState;

    #[test]
    fn a_seed_imports_into_two_groups_with_both_sides_of_each_friendship() {
        let seed = Seed {
            users: (1..=200).map(|u| (u, format!("u{u}"))).collect(),
            friendships: (1..200).map(|u| (u, u + 1)).collect(),
            follows: vec![(5, 150)],
        };
        let ranges = [
            UserRange::new(1, 100).expect("r"),
            UserRange::new(100, 201).expect("r"),
        ];
        let mut states: Vec<GroupState> = ranges.iter().map(|r| GroupState::new(*r)).collect();
        for (s, r) in states.iter_mut().zip(ranges) {
            for b in seed.batches_for(r) {
                let cmd = crate::Command::Import(b);
                assert!(cmd.validate(s).is_ok());
                assert!(matches!(
                    s.apply(&cmd, 1),
                    crate::CommandResult::Imported { skipped: 0, .. }
                ));
            }
        }
        let user = |u: u64| states[usize::from(u >= 100)].user(u).expect("registered").clone();
        assert!(user(99).friends.contains(100) && user(100).friends.contains(99));
        assert_eq!(user(50).friends.len(), 2);
        assert!(user(5).rare().followers.contains(150) && user(150).rare().following.contains(5));
        let dir = tempfile::TempDir::new().expect("tmp");
        seed.write(&dir.path().join("s")).expect("write");
        assert_eq!(Seed::read(&dir.path().join("s")).expect("read"), seed);
    }
}
