//! Friend sets and the routing of user ids to the shard groups that own them.
//!
//! Owns [`FriendSet`] (a user's friends or followers: 64-bit user ids, Elias–Fano coded),
//! [`UserRange`] (a half-open id range `[start, end)`) and [`RangeTable`] (which group owns which
//! range), plus the one-pass split of a friend set by owner, [`FriendSet::split_by_ranges`], that
//! a home shard uses to forward an update to the shard groups of the user's friends. This module
//! never decides *who may see whom* (privacy is the caller's), and never looks at locations.

use std::fmt;

use roaring::RoaringTreemap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::RangeError;
use crate::geo::UserId;

mod packed;

use packed::Packed;

/// A set of user ids (someone's friends, or followers), Elias–Fano coded (`friends/packed.rs`).
///
/// User ids are spread over the whole 64-bit space (ranges are cut evenly across it), where a
/// roaring bitmap keeps one container per distinct upper half and cost ~65 bytes per id, and a
/// sorted array 8 bytes. Coded, a few hundred spread ids take ~7.4 bytes each (fewer when they
/// are bunched in a range), and `contains` jumps to the id's bucket through a small directory,
/// without allocating. Sets change rarely (a friendship) and are read on every update, so an
/// insert or a remove codes the set again once.
///
/// Serialises as roaring's portable format (the format the C/Java/Go roaring libraries share),
/// wrapped as a byte string, as it always has: snapshots written before read the same. Id 0 is
/// never a user: callers validate ids with [`crate::geo::check_user_id`] before inserting.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct FriendSet(Packed);

impl FriendSet {
    /// An empty set.
    pub const fn new() -> Self {
        Self(Packed::EMPTY)
    }

    /// Adds `id`; returns true if it was not already present.
    pub fn insert(&mut self, id: UserId) -> bool {
        let mut ids: Vec<UserId> = self.iter().collect();
        let Err(at) = ids.binary_search(&id) else {
            return false;
        };
        ids.insert(at, id);
        self.0 = Packed::from_sorted(&ids);
        true
    }

    /// Adds every id of `ids`, in any order; returns how many were not already present. The set
    /// is coded once for them all, where [`FriendSet::insert`] codes it once per id.
    pub fn insert_all(&mut self, ids: &[UserId]) -> usize {
        let before = self.0.len();
        if ids.iter().all(|&id| self.contains(id)) {
            return 0;
        }
        *self = self.iter().chain(ids.iter().copied()).collect();
        self.0.len() - before
    }

    /// Removes `id`; returns true if it was present.
    pub fn remove(&mut self, id: UserId) -> bool {
        if !self.contains(id) {
            return false;
        }
        let ids: Vec<UserId> = self.iter().filter(|&other| other != id).collect();
        self.0 = Packed::from_sorted(&ids);
        true
    }

    /// True if `id` is in the set.
    pub fn contains(&self, id: UserId) -> bool {
        self.0.contains(id)
    }

    /// Number of ids.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// True if the set has no ids.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The ids in ascending order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = UserId> + '_ {
        self.0.iter()
    }

    /// Splits the set by owner: one pass over the (ascending) ids and the (ascending) ranges,
    /// O(friends + ranges) time, one `Vec` per range that holds at least one id.
    ///
    /// The result lists, in range order, one `(group, ids)` per range that contains friends —
    /// a group owning several ranges appears once per range, which callers may merge — and,
    /// separately, the ids that fall in no range of the table
    /// ([`RangeSplit::unrouted`]): a table with holes (e.g. during a range move) must not
    /// silently drop friends, so the caller decides whether to retry or report them.
    pub fn split_by_ranges<'a, G>(&self, table: &'a RangeTable<G>) -> RangeSplit<'a, G> {
        // A single forward walk over ids and ranges together: O(friends + ranges).
        let mut ids = self.iter().peekable();
        let mut groups: Vec<(&'a G, Vec<UserId>)> = Vec::new();
        let mut unrouted = Vec::new();
        for (range, group) in table.ranges() {
            if ids.peek().is_none() {
                break;
            }
            while let Some(id) = ids.next_if(|&id| id < range.start) {
                unrouted.push(id);
            }
            let run: Vec<UserId> = std::iter::from_fn(|| ids.next_if(|&id| id < range.end)).collect();
            if !run.is_empty() {
                groups.push((group, run));
            }
        }
        unrouted.extend(ids);
        RangeSplit { groups, unrouted }
    }
}

impl fmt::Debug for FriendSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<UserId> for FriendSet {
    fn from_iter<I: IntoIterator<Item = UserId>>(iter: I) -> Self {
        let mut ids: Vec<UserId> = iter.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        Self(Packed::from_sorted(&ids))
    }
}

impl Serialize for FriendSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The ids are sorted and unique, so this cannot fail; the fallback is never taken.
        let bitmap = RoaringTreemap::from_sorted_iter(self.iter()).unwrap_or_else(|_| self.iter().collect());
        bitmap.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for FriendSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Roaring iterates in ascending order: the ids come out sorted and unique.
        let bitmap = RoaringTreemap::deserialize(deserializer)?;
        let ids: Vec<UserId> = bitmap.iter().collect();
        Ok(Self(Packed::from_sorted(&ids)))
    }
}

/// The result of [`FriendSet::split_by_ranges`].
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSplit<'a, G> {
    /// One entry per range holding at least one id, in range order; ids ascending.
    pub groups: Vec<(&'a G, Vec<UserId>)>,
    /// Ids that no range of the table contains, ascending.
    pub unrouted: Vec<UserId>,
}

/// A half-open range of user ids, `[start, end)`, holding at least one id.
///
/// Because `end` is exclusive, id `u64::MAX` is in no range; ids are allocated below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawUserRange", into = "RawUserRange")]
pub struct UserRange {
    /// First id in the range.
    pub start: UserId,
    /// First id after the range.
    pub end: UserId,
}

#[derive(Serialize, Deserialize)]
struct RawUserRange {
    start: UserId,
    end: UserId,
}

impl TryFrom<RawUserRange> for UserRange {
    type Error = RangeError;
    fn try_from(raw: RawUserRange) -> Result<Self, RangeError> {
        UserRange::new(raw.start, raw.end)
    }
}

impl From<UserRange> for RawUserRange {
    fn from(r: UserRange) -> Self {
        RawUserRange {
            start: r.start,
            end: r.end,
        }
    }
}

impl UserRange {
    /// The range `[start, end)`.
    ///
    /// # Errors
    /// [`RangeError::Empty`] if `start >= end`.
    pub fn new(start: UserId, end: UserId) -> Result<Self, RangeError> {
        if start < end {
            Ok(Self { start, end })
        } else {
            Err(RangeError::Empty { start, end })
        }
    }

    /// True if `start <= id < end`.
    pub fn contains(&self, id: UserId) -> bool {
        self.start <= id && id < self.end
    }
}

impl fmt::Display for UserRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// Which owner `G` (e.g. a shard group id) holds each user range: sorted by start, no overlaps.
/// Holes are allowed (ids in no range have no owner).
#[derive(Debug, Clone, PartialEq)]
pub struct RangeTable<G> {
    entries: Vec<(UserRange, G)>,
}

impl<G> RangeTable<G> {
    /// A table with no ranges.
    pub fn empty() -> Self {
        Self { entries: Vec::new() }
    }

    /// Builds a table from ranges in any order.
    ///
    /// # Errors
    /// [`RangeError::Overlap`] naming the first two ranges (by start) that share an id.
    pub fn new(mut entries: Vec<(UserRange, G)>) -> Result<Self, RangeError> {
        entries.sort_by_key(|(r, _)| (r.start, r.end));
        for pair in entries.windows(2) {
            let (first, second) = (pair[0].0, pair[1].0);
            if second.start < first.end {
                return Err(RangeError::Overlap { first, second });
            }
        }
        Ok(Self { entries })
    }

    /// The owner of `id`, found by binary search: O(log ranges).
    pub fn locate(&self, id: UserId) -> Option<&G> {
        let idx = self.entries.partition_point(|(r, _)| r.start <= id);
        let (range, group) = self.entries.get(idx.checked_sub(1)?)?;
        range.contains(id).then_some(group)
    }

    /// The ranges with their owners, ascending by start.
    pub fn ranges(&self) -> &[(UserRange, G)] {
        &self.entries
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the table has no ranges.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, end: u64) -> UserRange {
        UserRange::new(start, end).unwrap()
    }

    #[test]
    fn friend_set_basics() {
        let mut s = FriendSet::new();
        assert!(s.is_empty());
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(u64::MAX - 1));
        assert!(s.insert(1 << 40));
        assert!(s.contains(1 << 40));
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5, 1 << 40, u64::MAX - 1]);
        assert!(s.remove(5));
        assert!(!s.remove(5));
        let t: FriendSet = [1 << 40, u64::MAX - 1].into_iter().collect();
        assert_eq!(s, t);
        let mut u: FriendSet = [3, 9].into_iter().collect();
        assert_eq!(u.insert_all(&[9, 1, 12, 1]), 2);
        assert_eq!(u.iter().collect::<Vec<_>>(), [1, 3, 9, 12]);
        assert_eq!(u.insert_all(&[3, 12]), 0);
        let bytes = crate::codec::encode(&s).unwrap();
        assert_eq!(crate::codec::decode::<FriendSet>(&bytes).unwrap(), s);
    }

    /// Snapshots written before sets were arrays (as a `RoaringTreemap`) read back the same,
    /// and a set writes the very same bytes.
    #[test]
    fn friend_sets_keep_the_roaring_wire_format() {
        let ids = [3u64, 9, 1 << 33, (1 << 33) + 7, u64::MAX - 2];
        let bitmap: RoaringTreemap = ids.iter().copied().collect();
        let old = crate::codec::encode(&bitmap).unwrap();
        let set: FriendSet = crate::codec::decode(&old).unwrap();
        assert!(set.iter().eq(ids));
        assert_eq!(crate::codec::encode(&set).unwrap(), old);
        let empty = crate::codec::encode(&FriendSet::new()).unwrap();
        assert_eq!(empty, crate::codec::encode(&RoaringTreemap::new()).unwrap());
    }

    #[test]
    fn garbage_friend_set_bytes_are_rejected() {
        let bytes = crate::codec::encode(&b"\x01\x02\x03\x04garbage"[..]).unwrap();
        assert!(crate::codec::decode::<FriendSet>(&bytes).is_err());
    }

    #[test]
    fn user_range_validation_and_display() {
        assert_eq!(r(100, 200).to_string(), "[100, 200)");
        assert_eq!(
            UserRange::new(5, 5).unwrap_err(),
            RangeError::Empty { start: 5, end: 5 }
        );
        assert!(UserRange::new(6, 5).is_err());
        assert!(r(100, 200).contains(100));
        assert!(!r(100, 200).contains(200));
        let bytes = crate::codec::encode(&(7u64, 3u64)).unwrap();
        assert!(crate::codec::decode::<UserRange>(&bytes).is_err());
        let bytes = crate::codec::encode(&r(3, 7)).unwrap();
        assert_eq!(crate::codec::decode::<UserRange>(&bytes).unwrap(), r(3, 7));
    }

    #[test]
    fn range_table_rejects_overlap_and_locates() {
        let err = RangeTable::new(vec![(r(0, 10), 'a'), (r(20, 30), 'c'), (r(9, 15), 'b')]).unwrap_err();
        assert_eq!(
            err,
            RangeError::Overlap {
                first: r(0, 10),
                second: r(9, 15)
            }
        );
        assert_eq!(err.to_string(), "user ranges [0, 10) and [9, 15) overlap");
        let t = RangeTable::new(vec![(r(20, 30), 'c'), (r(0, 10), 'a'), (r(10, 15), 'b')]).unwrap();
        assert_eq!(t.locate(0), Some(&'a'));
        assert_eq!(t.locate(9), Some(&'a'));
        assert_eq!(t.locate(10), Some(&'b'));
        assert_eq!(t.locate(15), None);
        assert_eq!(t.locate(29), Some(&'c'));
        assert_eq!(t.locate(30), None);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn split_example() {
        let t = RangeTable::new(vec![(r(1, 10), "g1"), (r(10, 20), "g2"), (r(30, 40), "g1")]).unwrap();
        let s: FriendSet = [2, 3, 15, 25, 31, 50].into_iter().collect();
        let split = s.split_by_ranges(&t);
        assert_eq!(
            split.groups,
            vec![(&"g1", vec![2, 3]), (&"g2", vec![15]), (&"g1", vec![31])]
        );
        assert_eq!(split.unrouted, vec![25, 50]);
    }

    fn table() -> impl Strategy<Value = RangeTable<usize>> {
        // Sorted distinct cut points; every other gap becomes a hole or a range.
        proptest::collection::btree_set(0..1_000u64, 2..20).prop_flat_map(|cuts| {
            let cuts: Vec<u64> = cuts.into_iter().collect();
            proptest::collection::vec(any::<bool>(), cuts.len()).prop_map(move |keep| {
                let entries = cuts
                    .windows(2)
                    .zip(&keep)
                    .enumerate()
                    .filter(|(_, (_, k))| **k)
                    .map(|(g, (w, _))| (r(w[0], w[1]), g))
                    .collect();
                RangeTable::new(entries).unwrap()
            })
        })
    }

    proptest! {
        /// A set behaves as a `BTreeSet` under any sequence of inserts and removes, stays sorted
        /// and exactly sized, and survives encoding.
        #[test]
        fn a_friend_set_behaves_as_a_sorted_set(
            ops in proptest::collection::vec((any::<bool>(), 1..200u64), 0..300),
        ) {
            let mut set = FriendSet::new();
            let mut model = std::collections::BTreeSet::new();
            for (add, id) in ops {
                // Spread over the whole id space, as ids of other groups are.
                let id = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                if add {
                    prop_assert_eq!(set.insert(id), model.insert(id));
                } else {
                    prop_assert_eq!(set.remove(id), model.remove(&id));
                }
                prop_assert_eq!(set.contains(id), model.contains(&id));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            prop_assert!(set.iter().eq(model.iter().copied()));
            let bytes = crate::codec::encode(&set).unwrap();
            prop_assert_eq!(crate::codec::decode::<FriendSet>(&bytes).unwrap(), set);
        }

        /// Every id lands exactly once: in the group `locate` names, or in `unrouted`.
        #[test]
        fn split_partitions_exactly(
            t in table(),
            ids in proptest::collection::btree_set(0..1_100u64, 0..300),
        ) {
            let set: FriendSet = ids.iter().copied().collect();
            let split = set.split_by_ranges(&t);
            let mut seen = Vec::new();
            for (g, part) in &split.groups {
                prop_assert!(!part.is_empty());
                prop_assert!(part.windows(2).all(|w| w[0] < w[1]));
                for id in part {
                    prop_assert_eq!(t.locate(*id), Some(*g));
                }
                seen.extend_from_slice(part);
            }
            for id in &split.unrouted {
                prop_assert_eq!(t.locate(*id), None);
            }
            seen.extend_from_slice(&split.unrouted);
            seen.sort_unstable();
            prop_assert_eq!(seen, ids.into_iter().collect::<Vec<_>>());
        }
    }
}
